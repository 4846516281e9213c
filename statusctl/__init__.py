"""statusctl: the control client for statusd, as a command and as a library.

``statusctl.client`` is the library (trio, and blocking classes for GUI threads);
``statusctl.cli`` is the command; ``statusctl.render`` turns results into text.
"""

from statusd import __version__

__all__ = ["__version__"]
