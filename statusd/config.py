"""The daemon's configuration: one frozen ``Config`` from flags, environment, a TOML file, defaults.

Precedence is flag > ``STATUSD_<KEY>`` environment variable > file > default (CONTRACT.md,
"Commands"). Every key is a row in ``_KEYS`` with its parser; a parser turns one raw value into
a typed one or says what is wrong, and the loader adds the key and where the value came from,
so a bad configuration stops start-up with one ``ConfigError`` line.

No trio and no side effects: the only I/O is reading the config file and looking up groups and
home directories. Directories are never created here; the daemon does that.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from statusd.errors import ConfigError
from statusd.proxy import NoProxy, ProxyEnvironment, hide_password, parse_proxy, proxy_rules
from statusd.state.bandwidth import MAX_RATE, parse_rate
from statusd.state.ring import MAX_CAPACITY

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_SOCKET_MODE = 0o660
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_LOG_LEVEL = "info"
DEFAULT_STATUS_HISTORY = 100
DEFAULT_MAX_RUNNING_TASKS = 3
GiB = 1 << 30
MAX_STATUS_HISTORY = MAX_CAPACITY
# CONTRACT.md caps one request's reply at 16 MiB; a client reading it needs a buffer that big.
MAX_REPLY_BYTES = 16 * 1024 * 1024
# One request line (Unix socket) or message (WebSocket); a peer can make the daemon buffer
# this much per connection before a byte of it is parsed.
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
MIN_REQUEST_BYTES = 1024
MAX_REQUEST_BYTES = 16 * 1024 * 1024
# Linux's sun_path holds 108 bytes including the terminating NUL; a longer path fails at bind()
# with an unhelpful error, so it is refused here with the key named.
MAX_SOCKET_PATH_BYTES = 107

ENV_PREFIX = "STATUSD_"
CONFIG_ENV = "STATUSD_CONFIG"
SOCKET_NAME = "statusd.sock"
CONFIG_NAME = "statusd.toml"


@attrs.frozen
class WebSocketConfig:
    """The optional WebSocket listener; ``listen=None`` means it is off."""

    listen: tuple[str, int] | None = None  # (host, port); an IPv6 host has no brackets
    allowed_origins: tuple[
        str, ...
    ] = ()  # "scheme://host[:port]", lower-case, default port dropped


@attrs.frozen
class DownloadsConfig:
    """How download tasks fetch: batching, parallelism, retries, limits."""

    # Why these two (docs/bench-daemon.md, "Defaults"): with 4 at a time in batches of 10
    # a task that nobody tuned ran at a third of aria2c's default speed on small files.
    # The per-file cost is mostly waiting (the server, the journal's fsync, the file
    # threads), so more items in flight share those waits; 16 measured best of 4-32.
    batch_size: int = 100  # every batch ends in a barrier, a status message and a push
    parallel_items: int = 16  # items of one task fetched at once
    max_attempts: int = 5  # per item, counting the first
    max_redirects: int = 20  # per attempt; wget's and aria2c's (curl's is 50)
    # A response's status line and headers; curl and aria2c take a 100 KB one, and real
    # servers send them (long cookies, CSP and link headers).
    max_response_head_bytes: int = 256 * 1024
    # 0: no cap. A sane default an admin can lift: one file may not fill a shared disk.
    max_file_bytes: int = 64 * GiB
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # seconds without a byte before an attempt fails
    # An item below lowest_speed bytes/s for stall_timeout seconds fails and frees its
    # slot: a server trickling a byte every 20 s never trips read_timeout. 0: off.
    lowest_speed: int = 1024
    stall_timeout: float = 60.0
    # Free bytes downloads leave on the state directory's file system (when they share
    # it), so the journals can always be written; 0: none.
    min_free_bytes: int = GiB
    # The proxy for every download, "http://[user:password@]host[:port]"; "" for none.
    # None: the daemon's http_proxy/https_proxy (statusd.proxy).
    proxy: str | None = None
    # Hosts reached without the proxy, as in no_proxy; None: the daemon's no_proxy.
    no_proxy: str | None = None
    # Bytes a second for all downloads together, shared by every item received; 0: none.
    # A task's own rate_limit applies beneath it.
    max_rate: int = 0
    # Requests in flight to one host at once, over all tasks (statusd.downloads.http).
    max_per_host: int = 6


@attrs.frozen
class LimitsConfig:
    """What one client may ask of the daemon (docs/protocol.md, "Limits")."""

    # 1,000,000 subscriptions on one connection took 240 MB and 39 ms per task update.
    max_subscriptions_per_connection: int = 256
    # A batch longer than this is refused whole; none of its entries run.
    max_batch_entries: int = 256
    # The results of one request (a batch's together); past it the rest are refused.
    max_reply_bytes: int = MAX_REPLY_BYTES
    # status.publish per user, a token bucket: ``publish_rate`` messages a second on
    # average, ``publish_burst`` at once; admins are exempt.
    publish_rate: float = 20.0
    publish_burst: int = 50
    # One user held all 1,024 connections and locked everyone out, root too. Per transport,
    # per uid on the Unix socket and per token on the WebSocket; admins are exempt.
    max_connections_per_user: int = 64
    # The last of max_connections (at most half of them) only admins may take.
    admin_connections: int = 16
    # Connections not yet admitted, per transport: WebSocket handshakes in progress, Unix
    # clients whose identity is being looked up. Slow handshakes held 1,024 open files.
    max_pending_handshakes: int = 256
    # Unfinished (pending, running, paused) tasks per user; admins are exempt. 200 queued
    # tasks of 10,000 URLs took one user's daemon from 37 MB to 1.05 GB and 18 s restarts.
    max_tasks_per_user: int = 100
    max_items_per_task: int = 10_000
    # Request headers of one download item, its own and its task's together: how many,
    # and their bytes as sent ("Name: value" and CRLF). Servers refuse heads past 8-16 KiB.
    max_item_headers: int = 32
    max_item_header_bytes: int = 16 * 1024
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # The status history is shared: one user's flood at the publish rate still wiped the
    # others' messages. Once it is full, a user's messages hold at most this percent of it.
    status_user_share: int = 25


@attrs.frozen
class Config:
    """The effective configuration, every value checked."""

    socket: Path
    state_dir: Path
    download_dir: Path
    socket_mode: int
    socket_group: str | None  # None: leave the socket's group alone (the daemon's own)
    admin_group: str | None  # None: admins are uid 0 and the daemon's own uid
    max_connections: int
    log_level: str
    status_history: int
    websocket: WebSocketConfig
    config_file: Path | None  # the TOML file actually read; None when none was
    socket_is_default: bool  # the daemon may create the default socket's parent directory
    max_running_tasks: int = DEFAULT_MAX_RUNNING_TASKS
    downloads: DownloadsConfig = DownloadsConfig()
    limits: LimitsConfig = LimitsConfig()
    # Read with the rest at start and on SIGHUP; [downloads] proxy and no_proxy win.
    proxy_environment: ProxyEnvironment = attrs.field(factory=ProxyEnvironment)


# --- defaults ---------------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """Where the config file is looked for when neither ``--config`` nor STATUSD_CONFIG is set."""
    environ, uid = _resolve(environ, uid)
    if uid == 0:
        return Path("/etc/statusd") / CONFIG_NAME
    return _xdg_dir(environ, uid, "XDG_CONFIG_HOME", ".config") / "statusd" / CONFIG_NAME


# The shared daemon's socket (contrib/systemd/statusd.socket); statusctl looks here after the
# caller's own.
SYSTEM_SOCKET_PATH = Path("/run/statusd") / SOCKET_NAME


def default_socket_path(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The socket path used when none is configured; statusctl looks here too."""
    environ, uid = _resolve(environ, uid)
    runtime_directory = _first_path(environ.get("RUNTIME_DIRECTORY"))
    if runtime_directory is not None:
        return runtime_directory / SOCKET_NAME
    if uid == 0:
        return SYSTEM_SOCKET_PATH
    runtime_dir = _absolute(environ.get("XDG_RUNTIME_DIR"))
    if runtime_dir is not None:
        return runtime_dir / "statusd" / SOCKET_NAME
    return Path(f"/tmp/statusd-{uid}") / SOCKET_NAME


def default_state_dir(environ: Mapping[str, str] | None = None, uid: int | None = None) -> Path:
    """The state directory used when none is configured."""
    environ, uid = _resolve(environ, uid)
    state_directory = _first_path(environ.get("STATE_DIRECTORY"))
    if state_directory is not None:
        return state_directory
    if uid == 0:
        return Path("/var/lib/statusd")
    return _xdg_dir(environ, uid, "XDG_STATE_HOME", ".local/state") / "statusd"


def _resolve(environ: Mapping[str, str] | None, uid: int | None) -> tuple[Mapping[str, str], int]:
    return (os.environ if environ is None else environ), (os.getuid() if uid is None else uid)


def _first_path(value: str | None) -> Path | None:
    # systemd joins several RuntimeDirectory=/StateDirectory= entries with ":".
    return _absolute(value.split(":", 1)[0]) if value else None


def _absolute(value: str | None) -> Path | None:
    # The XDG base directory spec says relative values are invalid and must be ignored.
    return Path(value) if value and os.path.isabs(value) else None


def _xdg_dir(environ: Mapping[str, str], uid: int, variable: str, fallback: str) -> Path:
    configured = _absolute(environ.get(variable))
    if configured is not None:
        return configured
    home = _home(environ, uid)
    if home is None:
        raise ConfigError(variable, f"not set, and neither is HOME (uid {uid} has no home)")
    return home / fallback


def _home(environ: Mapping[str, str], uid: int) -> Path | None:
    home = _absolute(environ.get("HOME"))
    if home is not None:
        return home
    try:
        return Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        return None


# --- parsers: one raw value in, a typed value out, or _BadValue saying what is wrong -----------


class _BadValue(Exception):
    """What is wrong with a value, before the loader adds its key and source."""


@attrs.frozen
class _Context:
    """What a parser may need to know about where a value came from."""

    home: Path | None  # for "~"
    cwd: Path | None  # flags are relative to the working directory; other sources must be absolute


def _show(value: object) -> str:
    """A value as it would be written in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _path(value: object, context: _Context) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise _BadValue(f"must be a non-empty path string, not {_show(value)}")
    path = Path(_expand_user(value, context.home))
    if path.is_absolute():
        return path
    if context.cwd is None:
        raise _BadValue(f"must be an absolute path, not {_show(value)}")
    return Path(os.path.normpath(context.cwd / path))


def _expand_user(text: str, home: Path | None) -> str:
    if text == "~" or text.startswith("~/"):
        if home is None:
            raise _BadValue(f"cannot expand {_show(text)}: HOME is not set")
        return str(home) + text[1:]
    if text.startswith("~"):
        expanded = os.path.expanduser(text)
        if expanded == text:
            raise _BadValue(f"cannot expand {_show(text)}: no such user")
        return expanded
    return text


_OCTAL_MODE = re.compile(r"(0o)?[0-7]{1,4}")


def _socket_mode(value: object, context: _Context) -> int:
    if isinstance(value, str) and _OCTAL_MODE.fullmatch(value):
        mode = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise _BadValue(f'must be an octal mode string like "0660", not {_show(value)}')
    if not 0 <= mode <= 0o777:
        hint = ' (a decimal integer; write "0660" or 0o660)' if isinstance(value, int) else ""
        raise _BadValue(f"must be within 0777, not {_show(value)}{hint}")
    if mode & 0o002:
        raise _BadValue(f"must not be world-writable, not {mode:04o}")
    return mode


def _group(value: object, context: _Context) -> str:
    if not isinstance(value, str) or not value:
        raise _BadValue(f"must be a group name, not {_show(value)}")
    try:
        grp.getgrnam(value)
    except KeyError:
        raise _BadValue(f"group {_show(value)} does not exist") from None
    return value


def _integer(low: int, high: int | None = None) -> Callable[[object, _Context], int]:
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(value: object, context: _Context) -> int:
        if (
            isinstance(value, bool)  # TOML's true is not 1
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise _BadValue(f"must be {wanted}, not {_show(value)}")
        return value

    return parse


def _seconds(value: object, context: _Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise _BadValue(f"must be a number of seconds from 0 to 86400, not {_show(value)}")
    return float(value)


def _rate(value: object, context: _Context) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1_000_000:
        raise _BadValue(
            f"must be a number of messages a second above 0 and at most 1000000, not {_show(value)}"
        )
    return float(value)


def _byte_rate(value: object, context: _Context) -> int:
    if isinstance(value, str):
        try:
            return parse_rate(value)
        except ValueError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_RATE:
        return value
    raise _BadValue(
        f'must be bytes a second from 0 (none) to {MAX_RATE}, or like "500K", "2M", '
        f"not {_show(value)}"
    )


def _proxy_url(value: object, context: _Context) -> str:
    if not isinstance(value, str):
        raise _BadValue(f'must be a proxy url string ("" for none), not {_show(value)}')
    if value:
        try:
            parse_proxy(value)
        except ValueError as exc:  # says what is wrong without the url: it may hold a password
            raise _BadValue(str(exc)) from None
    return value.strip()


def _no_proxy(value: object, context: _Context) -> str:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ",".join(item.strip() for item in value if item.strip())
    if not isinstance(value, str):
        raise _BadValue(f"must be a string of comma-separated hosts, not {_show(value)}")
    try:
        NoProxy.parse(value)
    except ValueError as exc:
        raise _BadValue(str(exc)) from None
    return value


def _number_text(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def _log_level(value: object, context: _Context) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise _BadValue(f"must be one of {', '.join(LOG_LEVELS)}, not {_show(value)}")
    return value.lower()


_LISTEN_EXAMPLE = '"127.0.0.1:8765" or "[::1]:8765"'


def _listen(value: object, context: _Context) -> tuple[str, int]:
    if not isinstance(value, str):
        raise _BadValue(f"must be HOST:PORT like {_LISTEN_EXAMPLE}, not {_show(value)}")
    if value.startswith("["):
        host, separator, port = value[1:].partition("]:")
    else:
        host, separator, port = value.rpartition(":")
        if ":" in host:
            raise _BadValue(f"an IPv6 host must be in brackets, like {_LISTEN_EXAMPLE}")
    if not separator or not host:
        raise _BadValue(f"must be HOST:PORT like {_LISTEN_EXAMPLE}, not {_show(value)}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise _BadValue(f"port must be from 1 to 65535, not {_show(port)}")
    return host, int(port)


# scheme://host[:port], the host a name, an IPv4 address or a bracketed IPv6 one; a lone
# trailing "/" is forgiven because that is how origins are often pasted from the address bar.
_ORIGIN = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9a-f:.]+\]|[^/?#@:\[\]\s]+)(:(?P<port>[0-9]{1,5}))?/?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(value: object, context: _Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _BadValue(f"must be an array of origin strings, not {_show(value)}")
    origins: list[str] = []
    for item in value:
        origin = _origin(item)
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def _origin(value: object) -> str:
    """Normalize as browsers send the Origin header: lower-case, no default port, no slash."""
    match = _ORIGIN.fullmatch(value.lower()) if isinstance(value, str) else None
    port = match["port"] if match else None
    if match is None or (port is not None and not 1 <= int(port) <= 65535):
        raise _BadValue(
            'each origin must be like "http://localhost:3000" (http or https, no path), '
            f"not {_show(value)}"
        )
    scheme, host = match["scheme"], match["host"]
    if port is None or int(port) == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{int(port)}"


# --- environment variables and flags are text; these turn text into what a TOML file holds ------


def _text(text: str) -> object:
    return text


def _integer_text(text: str) -> object:
    # Anything that is not an integer stays text, so the parser's message shows it as written.
    stripped = text.strip()
    return int(stripped) if re.fullmatch(r"[+-]?[0-9]+", stripped) else text


def _comma_list(text: str) -> object:
    return [item.strip() for item in text.split(",") if item.strip()]


# --- the table of keys --------------------------------------------------------------------------


@attrs.frozen
class _Key:
    name: str  # as written in the file; "websocket.listen" is `listen` in the [websocket] table
    parse: Callable[[object, _Context], Any]
    from_text: Callable[[str], object] = _text
    flag_override: str | None = None

    @property
    def field(self) -> str:
        """The key in the ``flags`` mapping: ``websocket_listen``."""
        return self.name.replace(".", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def flag(self) -> str:
        return self.flag_override or "--" + self.field.replace("_", "-")


_KEYS = (
    _Key("socket", _path),
    _Key("state_dir", _path),
    _Key("download_dir", _path),
    _Key("socket_mode", _socket_mode),
    _Key("socket_group", _group),
    _Key("admin_group", _group),
    _Key("max_connections", _integer(1), _integer_text),
    _Key("log_level", _log_level),
    _Key("status_history", _integer(1, MAX_STATUS_HISTORY), _integer_text),
    _Key("max_running_tasks", _integer(1, 64), _integer_text),
    _Key("downloads.batch_size", _integer(1, 1000), _integer_text),
    _Key("downloads.parallel_items", _integer(1, 64), _integer_text),
    _Key("downloads.max_attempts", _integer(1, 100), _integer_text),
    _Key("downloads.max_redirects", _integer(0, 100), _integer_text),
    _Key("downloads.max_response_head_bytes", _integer(1024, 16 << 20), _integer_text),
    _Key("downloads.max_file_bytes", _integer(0), _integer_text),
    _Key("downloads.connect_timeout", _seconds, _number_text),
    _Key("downloads.read_timeout", _seconds, _number_text),
    _Key("downloads.lowest_speed", _integer(0), _integer_text),
    _Key("downloads.stall_timeout", _seconds, _number_text),
    _Key("downloads.min_free_bytes", _integer(0), _integer_text),
    _Key("downloads.proxy", _proxy_url),
    _Key("downloads.no_proxy", _no_proxy),
    _Key("downloads.max_rate", _byte_rate, _integer_text),
    _Key("downloads.max_per_host", _integer(1, 1024), _integer_text),
    _Key("limits.max_subscriptions_per_connection", _integer(1, 1_000_000), _integer_text),
    _Key("limits.max_batch_entries", _integer(1, 100_000), _integer_text),
    _Key("limits.max_reply_bytes", _integer(1024, MAX_REPLY_BYTES), _integer_text),
    _Key("limits.publish_rate", _rate, _number_text),
    _Key("limits.publish_burst", _integer(1, 1_000_000), _integer_text),
    _Key("limits.max_connections_per_user", _integer(1, 1_000_000), _integer_text),
    _Key("limits.admin_connections", _integer(0, 1_000_000), _integer_text),
    _Key("limits.max_pending_handshakes", _integer(1, 1_000_000), _integer_text),
    _Key("limits.max_tasks_per_user", _integer(1, 1_000_000), _integer_text),
    _Key("limits.max_items_per_task", _integer(1, 1_000_000), _integer_text),
    _Key("limits.max_item_headers", _integer(0, 1000), _integer_text),
    _Key("limits.max_item_header_bytes", _integer(0, 1 << 20), _integer_text),
    _Key("limits.status_user_share", _integer(1, 100), _integer_text),
    _Key(
        "limits.max_request_bytes",
        _integer(MIN_REQUEST_BYTES, MAX_REQUEST_BYTES),
        _integer_text,
    ),
    _Key("websocket.listen", _listen, flag_override="--websocket"),
    _Key("websocket.allowed_origins", _origins, _comma_list),
)
_KEYS_BY_NAME = {key.name: key for key in _KEYS}
_TABLES = {key.name.partition(".")[0] for key in _KEYS if "." in key.name}
_KEYS_BY_FIELD = {key.field: key for key in _KEYS}
_KNOWN_ENV = {key.env for key in _KEYS} | {CONFIG_ENV}
_CONFIG_KEY = _Key("config", _path)


@attrs.frozen
class _Raw:
    """One key's unparsed value and where it came from."""

    value: object
    source: str
    context: _Context


# --- loading ------------------------------------------------------------------------------------


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> Config:
    """Build the effective configuration, or raise ``ConfigError`` naming the first bad key.

    ``flags`` maps key names (``socket``, ``websocket_listen``, ..., and ``config`` for the
    file) to command-line values; ``None`` means the flag was not given.
    """
    environ, uid = _resolve(environ, uid)
    given = {name: value for name, value in (flags or {}).items() if value is not None}
    home = _home(environ, uid)
    flag_context = _Context(home=home, cwd=Path.cwd())
    other_context = _Context(home=home, cwd=None)

    _check_environment(environ)
    config_file, file_values = _read_config_file(given, environ, uid, flag_context, other_context)
    layers = (
        _flag_layer(given, flag_context),
        _env_layer(environ, other_context),
        _file_layer(file_values, config_file, other_context),
    )
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in _KEYS:
        raw = next((layer[key.name] for layer in layers if key.name in layer), None)
        if raw is not None:
            values[key.name] = _parse(key, raw)
            sources[key.name] = raw.source
    return _assemble(values, sources, config_file, environ, uid)


def _parse(key: _Key, raw: _Raw) -> Any:
    try:
        return key.parse(raw.value, raw.context)
    except _BadValue as exc:
        raise ConfigError(key.name, str(exc), raw.source) from None


def _check_environment(environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in _KNOWN_ENV:
            raise ConfigError(name, "unknown environment variable" + _hint(name, _KNOWN_ENV))


def _hint(name: str, known: set[str] | Mapping[str, object]) -> str:
    # "listen" at the top level most likely belongs in a table: suggest "websocket.listen".
    close = [key for key in known if key.rpartition(".")[2] == name]
    close = close or difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _flag_layer(given: Mapping[str, Any], context: _Context) -> dict[str, _Raw]:
    layer: dict[str, _Raw] = {}
    for field, value in given.items():
        if field == _CONFIG_KEY.field:
            continue
        key = _KEYS_BY_FIELD.get(field)
        if key is None:
            raise ConfigError(field, "unknown flag" + _hint(field, _KEYS_BY_FIELD))
        raw = key.from_text(value) if isinstance(value, str) else value
        layer[key.name] = _Raw(raw, key.flag, context)
    return layer


def _env_layer(environ: Mapping[str, str], context: _Context) -> dict[str, _Raw]:
    return {
        key.name: _Raw(key.from_text(environ[key.env]), key.env, context)
        for key in _KEYS
        if key.env in environ
    }


def _file_layer(
    values: Mapping[str, object], path: Path | None, context: _Context
) -> dict[str, _Raw]:
    return {name: _Raw(value, str(path), context) for name, value in values.items()}


def _read_config_file(
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    uid: int,
    flag_context: _Context,
    other_context: _Context,
) -> tuple[Path | None, dict[str, object]]:
    """Find, read and flatten the TOML file; a missing file is only fine if it is the default."""
    if _CONFIG_KEY.field in given:
        raw = _Raw(given[_CONFIG_KEY.field], "--config", flag_context)
    elif CONFIG_ENV in environ:
        raw = _Raw(environ[CONFIG_ENV], CONFIG_ENV, other_context)
    else:
        path = default_config_path(environ, uid)
        table = _read_toml(path, source=None)
        return (None, {}) if table is None else (path, _flatten(table, path))
    path = _parse(_CONFIG_KEY, raw)
    table = _read_toml(path, source=raw.source)
    if table is None:
        raise ConfigError("config", f"file {path} does not exist", raw.source)
    return path, _flatten(table, path)


def _read_toml(path: Path, source: str | None) -> dict[str, Any] | None:
    """The parsed file, or None when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}", source) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        problem = f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}"
        raise ConfigError("config", problem, source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"invalid TOML in {path}: {exc}", source) from None


def _flatten(table: Mapping[str, Any], path: Path) -> dict[str, object]:
    """Keys as in ``_KEYS`` ("websocket.listen"); an unknown one is an error naming it."""
    flat: dict[str, object] = {}
    for name, value in table.items():
        if name in _TABLES and isinstance(value, dict):
            flat.update({f"{name}.{sub}": subvalue for sub, subvalue in value.items()})
        elif name in _TABLES:
            raise ConfigError(name, f"must be a table, not {_show(value)}", str(path))
        else:
            flat[name] = value
    for name in flat:
        if name not in _KEYS_BY_NAME:
            raise ConfigError(name, "unknown key" + _hint(name, _KEYS_BY_NAME), str(path))
    return flat


def _assemble(
    values: Mapping[str, Any],
    sources: Mapping[str, str],
    config_file: Path | None,
    environ: Mapping[str, str],
    uid: int,
) -> Config:
    socket_is_default = "socket" not in values
    socket = default_socket_path(environ, uid) if socket_is_default else values["socket"]
    _check_socket(socket, sources.get("socket", "default"), explicit=not socket_is_default)
    if socket_is_default:
        _check_runtime_dir(socket, environ)
    if "socket_group" in values:
        _check_socket_group(values["socket_group"], sources["socket_group"])
    state_dir = values["state_dir"] if "state_dir" in values else default_state_dir(environ, uid)
    proxy_environment = ProxyEnvironment.read(environ)
    try:
        proxy_rules(
            values.get("downloads.proxy"), values.get("downloads.no_proxy"), proxy_environment
        )
    except ValueError as exc:  # "https_proxy: proxy url scheme must be http, not 'socks5'"
        variable, _, problem = str(exc).partition(": ")
        raise ConfigError(variable, problem, "environment") from None
    download_dir = values.get("download_dir", state_dir / "downloads")
    return Config(
        socket=socket,
        state_dir=state_dir,
        download_dir=download_dir,
        socket_mode=values.get("socket_mode", DEFAULT_SOCKET_MODE),
        socket_group=values.get("socket_group"),
        admin_group=values.get("admin_group"),
        max_connections=values.get("max_connections", DEFAULT_MAX_CONNECTIONS),
        log_level=values.get("log_level", DEFAULT_LOG_LEVEL),
        status_history=values.get("status_history", DEFAULT_STATUS_HISTORY),
        websocket=WebSocketConfig(
            listen=values.get("websocket.listen"),
            allowed_origins=values.get("websocket.allowed_origins", ()),
        ),
        config_file=config_file,
        socket_is_default=socket_is_default,
        max_running_tasks=values.get("max_running_tasks", DEFAULT_MAX_RUNNING_TASKS),
        downloads=DownloadsConfig(
            **{
                key.partition(".")[2]: value
                for key, value in values.items()
                if key.startswith("downloads.")
            }
        ),
        limits=LimitsConfig(
            **{
                key.partition(".")[2]: value
                for key, value in values.items()
                if key.startswith("limits.")
            }
        ),
        proxy_environment=proxy_environment,
    )


def _check_socket(path: Path, source: str, *, explicit: bool) -> None:
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        problem = (
            f"path is {size} bytes, a Unix socket path must be at most {MAX_SOCKET_PATH_BYTES}"
        )
        raise ConfigError("socket", problem, source)
    # The daemon creates the default socket's directory; an explicit one must already exist.
    if explicit and not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise ConfigError("socket", f"directory {path.parent} {what}", source)


def _check_runtime_dir(socket: Path, environ: Mapping[str, str]) -> None:
    # The login manager makes XDG_RUNTIME_DIR (the user's own, 0700) and removes it at
    # logout. A missing one is a session that is gone or a mistyped variable; making it
    # ourselves would give the socket a directory nobody cleans up.
    runtime_dir = _absolute(environ.get("XDG_RUNTIME_DIR"))
    if runtime_dir is None or socket.parent.parent != runtime_dir or runtime_dir.is_dir():
        return
    what = "is not a directory" if runtime_dir.exists() else "does not exist"
    raise ConfigError(
        "XDG_RUNTIME_DIR",
        f"{runtime_dir} {what}; the default socket goes there (set socket to put it elsewhere)",
    )


def _check_socket_group(name: str, source: str) -> None:
    # Without CAP_CHOWN, chown(2) gives a file only to a group its owner is in: find out
    # now, not after the socket is bound. The process's own groups are the ones that count
    # (systemd's SupplementaryGroups= are in no group file).
    if os.geteuid() == 0 or grp.getgrnam(name).gr_gid in {os.getegid(), *os.getgroups()}:
        return
    problem = f"the daemon's user (uid {os.geteuid()}) is not in group {_show(name)}"
    raise ConfigError("socket_group", f"{problem}, so it cannot give the socket to it", source)


# --- rendering ----------------------------------------------------------------------------------


def render_config(config: Config) -> str:
    """The effective values as a TOML file that ``load_config`` reads back to the same Config."""
    source = str(config.config_file) if config.config_file else "none"
    websocket = config.websocket
    lines = [
        "# statusd effective configuration",
        f"# config file: {source}",
        "",
        f"socket = {_toml_string(str(config.socket))}",
        f"state_dir = {_toml_string(str(config.state_dir))}",
        f"download_dir = {_toml_string(str(config.download_dir))}",
        f'socket_mode = "{config.socket_mode:04o}"',
        _optional("socket_group", config.socket_group, "the socket keeps the daemon's group"),
        _optional("admin_group", config.admin_group, "admins are uid 0 and the daemon's uid"),
        f"max_connections = {config.max_connections}",
        f"log_level = {_toml_string(config.log_level)}",
        f"status_history = {config.status_history}",
        f"max_running_tasks = {config.max_running_tasks}",
        "",
        "[websocket]",
        _optional("listen", _format_listen(websocket.listen), "the WebSocket listener is off"),
        f"allowed_origins = [{', '.join(map(_toml_string, websocket.allowed_origins))}]",
        "",
        "[downloads]",
        *(
            f"{field.name} = {getattr(config.downloads, field.name)!r}"
            for field in attrs.fields(DownloadsConfig)
            if field.name not in ("proxy", "no_proxy")
        ),
        _optional(
            "proxy",
            None if config.downloads.proxy is None else hide_password(config.downloads.proxy),
            "http_proxy and https_proxy of the daemon's environment",
        ),
        _optional("no_proxy", config.downloads.no_proxy, "no_proxy of the daemon's environment"),
        "",
        "[limits]",
        *(
            f"{field.name} = {getattr(config.limits, field.name)!r}"
            for field in attrs.fields(LimitsConfig)
        ),
    ]
    return "\n".join(lines) + "\n"


def _optional(name: str, value: str | None, meaning_when_unset: str) -> str:
    if value is None:
        return f"# {name} is unset: {meaning_when_unset}"
    return f"{name} = {_toml_string(value)}"


def _format_listen(listen: tuple[str, int] | None) -> str | None:
    if listen is None:
        return None
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _toml_string(text: str) -> str:
    """A TOML basic string; json.dumps is close but escapes differently (\\ud83d, DEL)."""
    escaped = []
    for char in text:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'
