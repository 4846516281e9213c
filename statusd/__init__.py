"""statusd: a Trio download-and-status daemon with a JSON-RPC control socket."""

__version__ = "0.1.0"
