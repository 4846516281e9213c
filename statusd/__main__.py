"""``python -m statusd``: the same as the ``statusd`` console script."""

from __future__ import annotations

from statusd.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
