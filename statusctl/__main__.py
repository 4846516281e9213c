"""``python -m statusctl``: the same as the ``statusctl`` console script."""

from __future__ import annotations

from statusctl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
