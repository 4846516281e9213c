"""``statusctl dashboard``'s link: the dashboard's URL with a token in its fragment, and
opening it in the user's browser without putting the token on a command line.

The token rides in the fragment (``#token=...``), which a browser never sends to a
server, so it reaches no request line, log or Referer; the page moves it into session
storage at once. A browser started with the URL as an argument would show it in
``/proc/PID/cmdline`` to every local user, so the browser is given a file instead (mode
0600, in ``$XDG_RUNTIME_DIR`` when there is one) that redirects to the link, as Jupyter
does.
"""

from __future__ import annotations

import html
import os
import tempfile
import webbrowser
from pathlib import Path
from urllib.parse import quote

UNSPECIFIED = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}
REDIRECT_NAME = "statusd-dashboard.html"


def dashboard_url(websocket_address: str, token: str) -> str:
    """``http://HOST:PORT/#token=T`` for the daemon's WebSocket address as ``daemon.info``
    gives it (``127.0.0.1:8765``, ``[::1]:8765``); a listener on every address is reached
    on loopback."""
    host, _, port = websocket_address.rpartition(":")
    host = UNSPECIFIED.get(host, host)
    return f"http://{host}:{port}/#token={quote(token, safe='')}"


def redirect_page(url: str) -> str:
    escaped = html.escape(url, quote=True)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">\n'
        f'<meta http-equiv="refresh" content="0;url={escaped}">\n'
        "<title>statusd dashboard</title></head>\n"
        f'<body><p><a href="{escaped}">Open the statusd dashboard</a></p></body></html>\n'
    )


def write_redirect(url: str, environ: dict[str, str] | None = None) -> Path:
    """A 0600 file that sends a browser on to ``url``. In ``$XDG_RUNTIME_DIR`` one file is
    replaced each time (the directory is the user's alone and gone at logout); without
    it, a new private file in the temporary directory."""
    runtime = (environ if environ is not None else dict(os.environ)).get("XDG_RUNTIME_DIR")
    directory = runtime if runtime and os.path.isdir(runtime) else None
    # mkstemp creates the file 0600 and exclusively, never through a planted symlink.
    fd, name = tempfile.mkstemp(prefix="statusd-dashboard-", suffix=".html", dir=directory)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(redirect_page(url))
    if directory is None:
        return Path(name)
    target = Path(directory) / REDIRECT_NAME
    os.replace(name, target)
    return target


def open_in_browser(url: str) -> bool:
    """Open ``url`` (through a redirect file) in the user's browser (``$BROWSER``, else
    what ``webbrowser`` finds); False when there is none or it would not start."""
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return webbrowser.open(write_redirect(url).as_uri())
