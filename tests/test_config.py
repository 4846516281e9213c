"""statusd.config (defaults, precedence, every refusal) and the statusd command line."""

from __future__ import annotations

import grp
import os
import subprocess
import sys
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import statusd
from statusd.cli import main
from statusd.config import (
    Config,
    LimitsConfig,
    WebSocketConfig,
    default_config_path,
    default_socket_path,
    load_config,
    render_config,
)
from statusd.errors import ConfigError
from tests.conftest import NOBODY_UID, run_as_nobody

UID = 1000
# The runner's own group: without root, the socket may only be given to a group one is in.
EXISTING_GROUP = grp.getgrgid(os.getegid()).gr_name
MISSING_GROUP = "statusd-test-no-such-group"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def environ(home: Path) -> dict[str, str]:
    """A non-root user's environment with no XDG variables set."""
    return {"HOME": str(home)}


def config_file(environ: Mapping[str, str], text: str) -> Path:
    """Write the default config file of a non-root user whose HOME is in ``environ``."""
    path = default_config_path(environ, UID)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(
    environ: Mapping[str, str], text: str | None = None, **flags: Any
) -> tuple[Config, Path | None]:
    path = config_file(environ, text) if text is not None else None
    return load_config(flags, environ, UID), path


def config_error(environ: Mapping[str, str], text: str | None = None, **flags: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(environ, text, **flags)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- defaults -----------------------------------------------------------------------------------


def test_defaults_for_a_user_with_xdg_directories(tmp_path: Path, environ: dict[str, str]) -> None:
    (tmp_path / "xdg-run").mkdir()
    environ |= {
        "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
        "XDG_RUNTIME_DIR": str(tmp_path / "xdg-run"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }
    config = load_config({}, environ, UID)
    assert config == Config(
        socket=tmp_path / "xdg-run/statusd/statusd.sock",
        state_dir=tmp_path / "xdg-state/statusd",
        download_dir=tmp_path / "xdg-state/statusd/downloads",
        socket_mode=0o660,
        socket_group=None,
        admin_group=None,
        max_connections=1024,
        log_level="info",
        status_history=100,
        websocket=WebSocketConfig(listen=None, allowed_origins=()),
        config_file=None,
        socket_is_default=True,
    )
    assert default_config_path(environ, UID) == tmp_path / "xdg-config/statusd/statusd.toml"


def test_defaults_for_a_user_without_xdg_directories(home: Path, environ: dict[str, str]) -> None:
    config = load_config({}, environ, UID)
    assert config.socket == Path(f"/tmp/statusd-{UID}/statusd.sock")
    assert config.state_dir == home / ".local/state/statusd"
    assert config.download_dir == home / ".local/state/statusd/downloads"
    assert default_config_path(environ, UID) == home / ".config/statusd/statusd.toml"


def test_relative_xdg_directories_are_ignored(home: Path, environ: dict[str, str]) -> None:
    environ |= {"XDG_CONFIG_HOME": "c", "XDG_RUNTIME_DIR": "r", "XDG_STATE_HOME": "s"}
    assert default_config_path(environ, UID) == home / ".config/statusd/statusd.toml"
    assert default_socket_path(environ, UID) == Path(f"/tmp/statusd-{UID}/statusd.sock")
    assert load_config({}, environ, UID).state_dir == home / ".local/state/statusd"


def test_defaults_for_root(tmp_path: Path) -> None:
    assert default_config_path({}, 0) == Path("/etc/statusd/statusd.toml")
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/0"}, 0) == Path(
        "/run/statusd/statusd.sock"
    )
    # Point the file elsewhere so the test never reads the real /etc.
    file = tmp_path / "statusd.toml"
    file.write_text("")
    environ = {"STATUSD_CONFIG": str(file), "XDG_STATE_HOME": str(tmp_path / "ignored")}
    config = load_config({}, environ, 0)
    assert config.socket == Path("/run/statusd/statusd.sock")
    assert config.state_dir == Path("/var/lib/statusd")
    assert config.download_dir == Path("/var/lib/statusd/downloads")
    assert config.config_file == file


@pytest.mark.parametrize("uid", [0, UID])
def test_systemd_directories_come_first_and_the_first_of_several_wins(
    tmp_path: Path, environ: dict[str, str], uid: int
) -> None:
    file = tmp_path / "empty.toml"
    file.write_text("")
    environ |= {
        "RUNTIME_DIRECTORY": "/run/statusd-a:/run/statusd-b",
        "STATE_DIRECTORY": "/var/lib/statusd-a:/var/lib/statusd-b",
        "XDG_RUNTIME_DIR": str(tmp_path / "xdg-run"),
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }
    config = load_config({"config": file}, environ, uid)
    assert config.socket == Path("/run/statusd-a/statusd.sock")
    assert config.state_dir == Path("/var/lib/statusd-a")
    assert config.download_dir == Path("/var/lib/statusd-a/downloads")
    assert config.socket_is_default


def test_default_socket_path_reads_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    assert default_socket_path() == tmp_path / "statusd.sock"


def test_a_missing_default_file_is_fine(environ: dict[str, str]) -> None:
    assert not default_config_path(environ, UID).exists()
    assert load_config({}, environ, UID).config_file is None


def test_the_default_file_is_read(environ: dict[str, str]) -> None:
    config, path = load(environ, "max_connections = 5\n")
    assert config.max_connections == 5
    assert config.config_file == path


def test_the_default_socket_directory_may_be_missing(tmp_path: Path) -> None:
    # The daemon makes $XDG_RUNTIME_DIR/statusd when it starts; loading makes nothing.
    environ = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path)}
    config = load_config({}, environ, UID)
    assert config.socket == tmp_path / "statusd/statusd.sock"
    assert config.socket_is_default
    assert not (tmp_path / "statusd").exists()


def test_a_missing_xdg_runtime_dir_is_refused(tmp_path: Path) -> None:
    # The login manager makes it; statusd will not make one nobody removes at logout.
    missing = tmp_path / "missing"
    environ = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(missing)}
    assert str(load_error({}, environ, UID)) == (
        f"XDG_RUNTIME_DIR: {missing} does not exist; the default socket goes there"
        " (set socket to put it elsewhere)"
    )
    (tmp_path / "file").write_text("")
    environ["XDG_RUNTIME_DIR"] = str(tmp_path / "file")
    assert str(load_error({}, environ, UID)).startswith(
        f"XDG_RUNTIME_DIR: {tmp_path / 'file'} is not a directory;"
    )
    assert not missing.exists()


def test_a_missing_xdg_runtime_dir_does_not_matter_with_a_socket(tmp_path: Path) -> None:
    environ = {"HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(tmp_path / "missing")}
    config = load_config({"socket": str(tmp_path / "s.sock")}, environ, UID)
    assert config.socket == tmp_path / "s.sock"
    # root's default socket is /run/statusd's, which XDG_RUNTIME_DIR does not decide.
    assert load_config({}, environ, 0).socket == Path("/run/statusd/statusd.sock")


def test_config_is_frozen(environ: dict[str, str]) -> None:
    config = load_config({}, environ, UID)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.max_connections = 1  # type: ignore[misc]


# --- precedence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_file", "in_env", "flag", "expected"),
    [
        (None, None, None, "info"),
        ("warning", None, None, "warning"),
        ("warning", "error", None, "error"),
        ("warning", "error", "debug", "debug"),
        (None, None, "debug", "debug"),
        ("warning", None, "debug", "debug"),
    ],
)
def test_flag_beats_environment_beats_file_beats_default(
    environ: dict[str, str],
    in_file: str | None,
    in_env: str | None,
    flag: str | None,
    expected: str,
) -> None:
    if in_env is not None:
        environ["STATUSD_LOG_LEVEL"] = in_env
    text = f'log_level = "{in_file}"\n' if in_file else ""
    config, _ = load(environ, text, log_level=flag)
    assert config.log_level == expected


def test_precedence_holds_for_paths_too(tmp_path: Path, environ: dict[str, str]) -> None:
    for name in ("file", "env", "flag"):
        (tmp_path / name).mkdir()
    environ["STATUSD_SOCKET"] = str(tmp_path / "env/s.sock")
    text = f'socket = "{tmp_path}/file/s.sock"\n'
    assert load(environ, text)[0].socket == tmp_path / "env/s.sock"
    flagged, _ = load(environ, text, socket=str(tmp_path / "flag/s.sock"))
    assert flagged.socket == tmp_path / "flag/s.sock"
    assert not flagged.socket_is_default


def test_every_key_has_an_environment_variable(tmp_path: Path, environ: dict[str, str]) -> None:
    environ |= {
        "STATUSD_SOCKET": str(tmp_path / "s.sock"),
        "STATUSD_STATE_DIR": str(tmp_path / "state"),
        "STATUSD_DOWNLOAD_DIR": str(tmp_path / "dl"),
        "STATUSD_SOCKET_MODE": "0600",
        "STATUSD_SOCKET_GROUP": EXISTING_GROUP,
        "STATUSD_ADMIN_GROUP": EXISTING_GROUP,
        "STATUSD_MAX_CONNECTIONS": " 12 ",
        "STATUSD_LOG_LEVEL": "Warning",
        "STATUSD_STATUS_HISTORY": "7",
        "STATUSD_WEBSOCKET_LISTEN": "127.0.0.1:9000",
        "STATUSD_WEBSOCKET_ALLOWED_ORIGINS": "http://localhost:3000, https://example.org",
    }
    config = load_config({}, environ, UID)
    assert config == Config(
        socket=tmp_path / "s.sock",
        state_dir=tmp_path / "state",
        download_dir=tmp_path / "dl",
        socket_mode=0o600,
        socket_group=EXISTING_GROUP,
        admin_group=EXISTING_GROUP,
        max_connections=12,
        log_level="warning",
        status_history=7,
        websocket=WebSocketConfig(
            listen=("127.0.0.1", 9000),
            allowed_origins=("http://localhost:3000", "https://example.org"),
        ),
        config_file=None,
        socket_is_default=False,
    )


def test_an_empty_origins_variable_clears_the_files_list(environ: dict[str, str]) -> None:
    environ["STATUSD_WEBSOCKET_ALLOWED_ORIGINS"] = ""
    config, _ = load(environ, '[websocket]\nallowed_origins = ["http://a"]\n')
    assert config.websocket.allowed_origins == ()


def test_download_dir_follows_the_effective_state_dir(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    config, _ = load(environ, f'state_dir = "{tmp_path}/file"\n', state_dir=str(tmp_path / "flag"))
    assert config.download_dir == tmp_path / "flag/downloads"
    text = f'state_dir = "{tmp_path}/s"\ndownload_dir = "{tmp_path}/d"\n'
    assert load(environ, text)[0].download_dir == tmp_path / "d"


def test_config_flag_beats_statusd_config(tmp_path: Path, environ: dict[str, str]) -> None:
    (tmp_path / "flag.toml").write_text("max_connections = 1\n")
    (tmp_path / "env.toml").write_text("max_connections = 2\n")
    config_file(environ, "max_connections = 3\n")
    environ["STATUSD_CONFIG"] = str(tmp_path / "env.toml")
    assert load_config({}, environ, UID).max_connections == 2
    flagged = load_config({"config": str(tmp_path / "flag.toml")}, environ, UID)
    assert flagged.max_connections == 1
    assert flagged.config_file == tmp_path / "flag.toml"


def test_flags_given_as_none_are_not_given(environ: dict[str, str]) -> None:
    config, _ = load(environ, 'log_level = "error"\n', log_level=None, socket=None, config=None)
    assert config.log_level == "error"


# --- values that are accepted -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "mode"),
    [('"0660"', 0o660), ('"640"', 0o640), ('"0o600"', 0o600), ("0o660", 0o660), ('"0"', 0)],
)
def test_socket_mode_forms(environ: dict[str, str], written: str, mode: int) -> None:
    assert load(environ, f"socket_mode = {written}\n")[0].socket_mode == mode


def test_groups_that_exist_are_kept(environ: dict[str, str]) -> None:
    text = f'socket_group = "{EXISTING_GROUP}"\nadmin_group = "{EXISTING_GROUP}"\n'
    config, _ = load(environ, text)
    assert (config.socket_group, config.admin_group) == (EXISTING_GROUP, EXISTING_GROUP)


def test_a_socket_group_the_daemons_user_is_not_in_is_refused(environ: dict[str, str]) -> None:
    group = grp.getgrgid(0).gr_name  # root's: the users below are not in it
    environ |= {"STATUSD_SOCKET_GROUP": group, "STATUSD_ADMIN_GROUP": group}

    def attempt() -> str:
        try:
            load_config({"config": "/dev/null"}, environ, UID)
        except ConfigError as exc:
            return str(exc)
        return "loaded"

    if os.geteuid() == 0:
        assert attempt() == "loaded"  # root may give a file to any group
        message, uid = run_as_nobody(attempt), NOBODY_UID
    else:
        message, uid = attempt(), os.geteuid()
    # admin_group names whose members are admins: the daemon need not be one of them.
    assert message == (
        f'socket_group: the daemon\'s user (uid {uid}) is not in group "{group}", so it cannot'
        " give the socket to it (from STATUSD_SOCKET_GROUP)"
    )


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:8765", ("127.0.0.1", 8765)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:8765", ("::1", 8765)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_websocket_listen_forms(
    environ: dict[str, str], listen: str, expected: tuple[str, int]
) -> None:
    config, _ = load(environ, f'[websocket]\nlisten = "{listen}"\n')
    assert config.websocket.listen == expected
    assert load(environ, websocket_listen=listen)[0].websocket.listen == expected


def test_allowed_origins_are_normalized_as_browsers_send_them(environ: dict[str, str]) -> None:
    text = (
        "[websocket]\nallowed_origins = ["
        '"http://localhost:3000", "HTTPS://Example.org/", "http://a:80", "https://b:443",'
        '"http://[::1]:8080", "http://localhost:3000"]\n'
    )
    config, _ = load(environ, text)
    assert config.websocket.allowed_origins == (
        "http://localhost:3000",
        "https://example.org",
        "http://a",
        "https://b",
        "http://[::1]:8080",
    )


def test_log_level_is_case_insensitive(environ: dict[str, str]) -> None:
    assert load(environ, 'log_level = "DEBUG"\n')[0].log_level == "debug"


def test_status_history_bounds(environ: dict[str, str]) -> None:
    assert load(environ, "status_history = 1\n")[0].status_history == 1
    assert load(environ, "status_history = 100000\n")[0].status_history == 100000


def test_tilde_expands_to_home(home: Path, environ: dict[str, str]) -> None:
    (home / "run").mkdir()
    text = 'socket = "~/run/s.sock"\nstate_dir = "~"\n'
    config, _ = load(environ, text)
    assert config.socket == home / "run/s.sock"
    assert config.state_dir == home


def test_relative_flag_paths_are_relative_to_the_working_directory(
    tmp_path: Path, environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub.toml").write_text("")
    config = load_config(
        {"socket": "s.sock", "state_dir": "./a/../st", "config": "sub.toml"}, environ
    )
    assert config.socket == tmp_path / "s.sock"
    assert config.state_dir == tmp_path / "st"
    assert config.config_file == tmp_path / "sub.toml"


def test_path_objects_are_accepted_as_flags(tmp_path: Path, environ: dict[str, str]) -> None:
    config, _ = load(environ, socket=tmp_path / "s.sock")
    assert config.socket == tmp_path / "s.sock"


# --- refusals: one line naming the key, the problem and the source -----------------------------


def test_a_bad_file_value_names_key_problem_and_file(environ: dict[str, str]) -> None:
    message = config_error(environ, "max_connections = 0\n")
    path = default_config_path(environ, UID)
    assert message == f"max_connections: must be an integer >= 1, not 0 (from {path})"


def test_a_bad_environment_value_names_the_variable(environ: dict[str, str]) -> None:
    environ["STATUSD_MAX_CONNECTIONS"] = "abc"
    assert config_error(environ) == (
        'max_connections: must be an integer >= 1, not "abc" (from STATUSD_MAX_CONNECTIONS)'
    )


def test_a_bad_flag_names_the_flag(environ: dict[str, str]) -> None:
    assert config_error(environ, log_level="loud") == (
        'log_level: must be one of debug, info, warning, error, not "loud" (from --log-level)'
    )
    assert config_error(environ, websocket_listen="nope").startswith("websocket.listen: ")
    assert config_error(environ, websocket_listen="nope").endswith("(from --websocket)")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('max_connections = "abc"', 'max_connections: must be an integer >= 1, not "abc"'),
        ("max_connections = true", "max_connections: must be an integer >= 1, not true"),
        ("max_connections = 1.5", "max_connections: must be an integer >= 1, not 1.5"),
        ("max_connections = -3", "max_connections: must be an integer >= 1, not -3"),
        ("status_history = 0", "status_history: must be an integer from 1 to 100000, not 0"),
        ("status_history = 100001", "status_history: must be an integer from 1 to 100000"),
        ('log_level = "verbose"', 'log_level: must be one of debug, info, warning, error, not "'),
        ("log_level = 10", "log_level: must be one of debug, info, warning, error, not 10"),
        ('socket_mode = "0666"', "socket_mode: must not be world-writable, not 0666"),
        ('socket_mode = "0602"', "socket_mode: must not be world-writable, not 0602"),
        ("socket_mode = 0o777", "socket_mode: must not be world-writable, not 0777"),
        ("socket_mode = 660", "socket_mode: must be within 0777, not 660 (a decimal integer"),
        ('socket_mode = "1777"', 'socket_mode: must be within 0777, not "1777"'),
        ('socket_mode = "rw-rw----"', 'socket_mode: must be an octal mode string like "0660"'),
        ('socket_mode = "0869"', 'socket_mode: must be an octal mode string like "0660"'),
        ("socket_mode = false", 'socket_mode: must be an octal mode string like "0660"'),
        ('socket = "relative/s.sock"', 'socket: must be an absolute path, not "relative/s.sock"'),
        ("socket = 5", "socket: must be a non-empty path string, not 5"),
        ('state_dir = "state"', 'state_dir: must be an absolute path, not "state"'),
        ('download_dir = ""', 'download_dir: must be a non-empty path string, not ""'),
        ("download_dir = ['/a']", "download_dir: must be a non-empty path string, not an array"),
        (f'socket_group = "{MISSING_GROUP}"', f'socket_group: group "{MISSING_GROUP}" does not'),
        (f'admin_group = "{MISSING_GROUP}"', f'admin_group: group "{MISSING_GROUP}" does not'),
        ("admin_group = 0", "admin_group: must be a group name, not 0"),
        ('socket_group = ""', 'socket_group: must be a group name, not ""'),
        ("websocket = 1", "websocket: must be a table, not 1"),
        ('[websocket]\nlisten = "localhost"', 'websocket.listen: must be HOST:PORT like "127.'),
        ('[websocket]\nlisten = ":8765"', "websocket.listen: must be HOST:PORT like"),
        ('[websocket]\nlisten = "[]:8765"', "websocket.listen: must be HOST:PORT like"),
        ('[websocket]\nlisten = "[::1]8765"', "websocket.listen: must be HOST:PORT like"),
        ('[websocket]\nlisten = "::1:8765"', "websocket.listen: an IPv6 host must be in brackets"),
        ('[websocket]\nlisten = "h:0"', 'websocket.listen: port must be from 1 to 65535, not "0"'),
        ('[websocket]\nlisten = "h:65536"', "websocket.listen: port must be from 1 to 65535"),
        ('[websocket]\nlisten = "h:http"', "websocket.listen: port must be from 1 to 65535"),
        ('[websocket]\nlisten = "h:"', "websocket.listen: port must be from 1 to 65535"),
        ("[websocket]\nlisten = 8765", "websocket.listen: must be HOST:PORT like"),
        (
            '[websocket]\nallowed_origins = "http://a"',
            'websocket.allowed_origins: must be an array of origin strings, not "http://a"',
        ),
        ('[websocket]\nallowed_origins = ["ftp://a"]', "websocket.allowed_origins: each origin"),
        ('[websocket]\nallowed_origins = ["http://a/app"]', "websocket.allowed_origins: each"),
        ('[websocket]\nallowed_origins = ["http://a?x=1"]', "websocket.allowed_origins: each"),
        ('[websocket]\nallowed_origins = ["http://u@a"]', "websocket.allowed_origins: each"),
        ('[websocket]\nallowed_origins = ["http://a:99999"]', "websocket.allowed_origins: each"),
        ('[websocket]\nallowed_origins = ["localhost:3000"]', "websocket.allowed_origins: each"),
        ('[websocket]\nallowed_origins = ["http://"]', "websocket.allowed_origins: each"),
        ("[websocket]\nallowed_origins = [1]", "websocket.allowed_origins: each origin must be"),
    ],
)
def test_bad_file_values_are_refused(environ: dict[str, str], text: str, expected: str) -> None:
    message = config_error(environ, text + "\n")
    assert message.startswith(expected)
    assert message.endswith(f"(from {default_config_path(environ, UID)})")


def test_unknown_key_in_the_file(environ: dict[str, str]) -> None:
    message = config_error(environ, "max_conections = 3\n")
    path = default_config_path(environ, UID)
    assert message == f"max_conections: unknown key (did you mean max_connections?) (from {path})"


def test_unknown_key_in_the_websocket_table(environ: dict[str, str]) -> None:
    message = config_error(environ, '[websocket]\nlisten = "h:1"\norigins = []\n')
    assert message.startswith("websocket.origins: unknown key")


def test_websocket_keys_at_the_top_level_are_unknown(environ: dict[str, str]) -> None:
    message = config_error(environ, 'listen = "h:1"\n')
    assert message.startswith("listen: unknown key (did you mean websocket.listen?)")


def test_unknown_statusd_environment_variable(environ: dict[str, str]) -> None:
    environ["STATUSD_MAX_CONECTIONS"] = "3"
    assert config_error(environ) == (
        "STATUSD_MAX_CONECTIONS: unknown environment variable"
        " (did you mean STATUSD_MAX_CONNECTIONS?)"
    )


def test_other_environment_variables_are_ignored(environ: dict[str, str]) -> None:
    environ |= {"STATUSDX": "1", "MY_STATUSD_THING": "1", "statusd_lower": "1"}
    assert load_config({}, environ, UID).max_connections == 1024


def test_invalid_toml_names_the_file(environ: dict[str, str]) -> None:
    message = config_error(environ, "max_connections = \n")
    path = default_config_path(environ, UID)
    assert message.startswith(f"config: invalid TOML in {path}: ")
    assert "line 1" in message


def test_a_file_that_is_not_utf8_is_refused(environ: dict[str, str]) -> None:
    path = config_file(environ, "")
    path.write_bytes(b'log_level = "\xff"\n')
    assert config_error(environ).startswith(f"config: {path} is not UTF-8 text")


def test_a_missing_config_flag_file_is_an_error(tmp_path: Path, environ: dict[str, str]) -> None:
    missing = tmp_path / "missing.toml"
    assert config_error(environ, config=str(missing)) == (
        f"config: file {missing} does not exist (from --config)"
    )


def test_a_missing_statusd_config_file_is_an_error(tmp_path: Path, environ: dict[str, str]) -> None:
    environ["STATUSD_CONFIG"] = str(tmp_path / "missing.toml")
    assert config_error(environ).endswith("does not exist (from STATUSD_CONFIG)")
    environ["STATUSD_CONFIG"] = "relative.toml"
    assert config_error(environ) == (
        'config: must be an absolute path, not "relative.toml" (from STATUSD_CONFIG)'
    )


def test_an_unreadable_config_file_is_an_error(tmp_path: Path, environ: dict[str, str]) -> None:
    message = config_error(environ, config=str(tmp_path))
    assert message.startswith(f"config: cannot read {tmp_path}: ")
    assert message.endswith("(from --config)")


def test_relative_environment_paths_are_refused(environ: dict[str, str]) -> None:
    environ["STATUSD_STATE_DIR"] = "state"
    assert config_error(environ) == (
        'state_dir: must be an absolute path, not "state" (from STATUSD_STATE_DIR)'
    )


def test_an_explicit_socket_in_a_missing_directory_is_refused(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    socket = tmp_path / "missing/s.sock"
    assert config_error(environ, socket=str(socket)) == (
        f"socket: directory {tmp_path / 'missing'} does not exist (from --socket)"
    )
    environ["STATUSD_SOCKET"] = str(socket)
    assert config_error(environ).endswith("does not exist (from STATUSD_SOCKET)")
    del environ["STATUSD_SOCKET"]
    assert config_error(environ, f'socket = "{socket}"\n').startswith("socket: directory ")


def test_a_socket_whose_parent_is_a_file_is_refused(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    (tmp_path / "file").write_text("")
    message = config_error(environ, socket=str(tmp_path / "file/s.sock"))
    assert message == f"socket: directory {tmp_path / 'file'} is not a directory (from --socket)"


def test_a_socket_path_too_long_for_sun_path_is_refused(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    socket = tmp_path / ("x" * 120)
    assert config_error(environ, socket=str(socket)).startswith("socket: path is ")
    environ["XDG_RUNTIME_DIR"] = str(tmp_path / ("y" * 120))
    assert config_error(environ).endswith("(from default)")


def test_tilde_without_a_home_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('state_dir = "~/state"\n')
    # An unassigned uid: no HOME and no passwd entry to fall back on.
    message = str(load_error({"config": str(file)}, {}, 4_000_000_000))
    assert message == f'state_dir: cannot expand "~/state": HOME is not set (from {file})'


def load_error(flags: Mapping[str, Any], environ: Mapping[str, str], uid: int) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(flags, environ, uid)
    return info.value


def test_the_error_carries_key_problem_and_source(environ: dict[str, str]) -> None:
    environ["STATUSD_STATUS_HISTORY"] = "0"
    error = load_error({}, environ, UID)
    assert (error.key, error.source) == ("status_history", "STATUSD_STATUS_HISTORY")
    assert error.problem == "must be an integer from 1 to 100000, not 0"


# --- render_config ------------------------------------------------------------------------------


def reload(config: Config, tmp_path: Path, environ: Mapping[str, str]) -> Config:
    file = tmp_path / "rendered.toml"
    file.write_text(render_config(config))
    return load_config({"config": str(file)}, environ, UID)


def test_render_config_round_trips_the_defaults(tmp_path: Path, environ: dict[str, str]) -> None:
    environ["XDG_RUNTIME_DIR"] = str(tmp_path)
    (tmp_path / "statusd").mkdir()
    config = load_config({}, environ, UID)
    rendered = tomllib.loads(render_config(config))
    assert rendered["socket_mode"] == "0660"
    assert "socket_group" not in rendered
    assert rendered["websocket"] == {"allowed_origins": []}
    reloaded = reload(config, tmp_path, environ)
    assert attrs.evolve(reloaded, config_file=None, socket_is_default=True) == config


def test_render_config_round_trips_every_value(tmp_path: Path, environ: dict[str, str]) -> None:
    odd = tmp_path / 'quote " back \\ tab \t é'
    odd.mkdir()
    config = Config(
        socket=odd / "s.sock",
        state_dir=odd / "state",
        download_dir=tmp_path / "dl",
        socket_mode=0o640,
        socket_group=EXISTING_GROUP,
        admin_group=EXISTING_GROUP,
        max_connections=3,
        log_level="debug",
        status_history=42,
        websocket=WebSocketConfig(
            listen=("::1", 8765), allowed_origins=("http://localhost:3000", "https://a.example")
        ),
        config_file=None,
        socket_is_default=False,
    )
    text = render_config(config)
    assert tomllib.loads(text)["websocket"]["listen"] == "[::1]:8765"
    reloaded = reload(config, tmp_path, environ)
    assert reloaded.config_file == tmp_path / "rendered.toml"
    assert attrs.evolve(reloaded, config_file=None) == config


# --- the statusd command ------------------------------------------------------------------------


def statusd_environment(tmp_path: Path) -> dict[str, str]:
    """Only what the command needs, all inside tmp_path, whoever runs the tests."""
    for name in ("run", "state"):
        (tmp_path / name).mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(statusd.__file__).resolve().parent.parent),
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "RUNTIME_DIRECTORY": str(tmp_path / "run"),
        "STATE_DIRECTORY": str(tmp_path / "state"),
    }


def run_statusd(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statusd", *args],
        env=statusd_environment(tmp_path) | env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_config_prints_the_effective_values(tmp_path: Path) -> None:
    file = tmp_path / "statusd.toml"
    file.write_text('max_connections = 7\n[websocket]\nlisten = "127.0.0.1:8765"\n')
    done = run_statusd(
        tmp_path, "--check-config", "--config", str(file), "--log-level", "DEBUG",
        STATUSD_STATUS_HISTORY="9",
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, "")
    printed = tomllib.loads(done.stdout)
    assert printed["socket"] == str(tmp_path / "run/statusd.sock")
    assert printed["state_dir"] == str(tmp_path / "state")
    assert printed["download_dir"] == str(tmp_path / "state/downloads")
    assert printed["max_connections"] == 7
    assert printed["log_level"] == "debug"
    assert printed["status_history"] == 9
    assert printed["websocket"]["listen"] == "127.0.0.1:8765"
    assert f"# config file: {file}" in done.stdout


def test_an_unknown_key_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    file = tmp_path / "statusd.toml"
    file.write_text("bogus_key = 1\n")
    done = run_statusd(tmp_path, "--check-config", "--config", str(file))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"statusd: config error: bogus_key: unknown key (from {file})\n"


def test_a_bad_flag_value_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    done = run_statusd(
        tmp_path, "--check-config", "--config", str(tmp_path / "empty.toml"), "--websocket", "h"
    )
    assert done.returncode == 2
    assert done.stderr.startswith("statusd: config error: websocket.listen: ")
    assert done.stderr.count("\n") == 1


def test_version(tmp_path: Path) -> None:
    done = run_statusd(tmp_path, "--version")
    assert (done.returncode, done.stdout) == (0, f"statusd {statusd.__version__}\n")
    assert statusd.__version__ == "0.1.0"


@pytest.fixture
def clean_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The process environment of statusd_environment, for calling main() in-process."""
    for name in list(os.environ):
        if name.startswith("STATUSD_") or name.startswith("XDG_"):
            monkeypatch.delenv(name)
    for name, value in statusd_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    file = tmp_path / "statusd.toml"
    file.write_text("")
    return file


def test_main_check_config_in_process(
    clean_environment: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--check-config", "--config", str(clean_environment)]) == 0
    assert tomllib.loads(capsys.readouterr().out)["log_level"] == "info"


def test_main_config_error_in_process(
    clean_environment: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATUSD_SOCKET_MODE", "0777")
    assert main(["--config", str(clean_environment)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "statusd: config error: socket_mode: must not be world-writable, not 0777"
        " (from STATUSD_SOCKET_MODE)\n"
    )


def test_main_sets_up_logging_and_returns_what_serve_returns(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[object] = []
    fake_logs = types.ModuleType("statusd.logs")
    fake_logs.setup_logging = calls.append  # type: ignore[attr-defined]
    fake_daemon = types.ModuleType("statusd.daemon")

    def serve(config: Config, reload: object = None) -> int:
        calls.append(config)
        return 3

    fake_daemon.serve = serve  # type: ignore[attr-defined]
    for name, module in (("logs", fake_logs), ("daemon", fake_daemon)):
        monkeypatch.setitem(sys.modules, f"statusd.{name}", module)
        monkeypatch.setattr(statusd, name, module, raising=False)

    assert main(["--config", str(clean_environment), "--log-level", "ERROR"]) == 3
    level, config = calls
    assert level == "error"
    assert isinstance(config, Config)
    assert config.config_file == clean_environment


def test_download_defaults_serve_a_user_who_tunes_nothing(environ: dict[str, str]) -> None:
    # docs/bench-daemon.md, "Defaults": at 4 items at a time in batches of 10, many small
    # files ran at a third of aria2c's default speed.
    downloads = load(environ)[0].downloads
    assert (downloads.parallel_items, downloads.batch_size) == (16, 100)
    text = "[downloads]\nparallel_items = 4\nbatch_size = 10\n"
    tuned = load(environ, text)[0].downloads
    assert (tuned.parallel_items, tuned.batch_size) == (4, 10)


# --- [limits] -----------------------------------------------------------------------------------


def test_limits_defaults(environ: dict[str, str]) -> None:
    limits = load(environ)[0].limits
    assert limits == LimitsConfig(
        max_subscriptions_per_connection=256,
        max_batch_entries=256,
        max_reply_bytes=16 * 1024 * 1024,
        publish_rate=20.0,
        publish_burst=50,
        max_connections_per_user=64,
        admin_connections=16,
        max_pending_handshakes=256,
        max_tasks_per_user=100,
        max_items_per_task=10_000,
        max_request_bytes=1024 * 1024,
        status_user_share=25,
    )


def test_connection_limits_come_from_the_file_the_environment_and_flags(
    environ: dict[str, str],
) -> None:
    text = "[limits]\nmax_connections_per_user = 8\nadmin_connections = 0\n"
    environ["STATUSD_LIMITS_MAX_PENDING_HANDSHAKES"] = "32"
    environ["STATUSD_LIMITS_ADMIN_CONNECTIONS"] = "4"
    config, _ = load(environ, text, limits_max_connections_per_user="2")
    assert (
        config.limits.max_connections_per_user,
        config.limits.admin_connections,
        config.limits.max_pending_handshakes,
    ) == (2, 4, 32)


def test_task_and_request_limits_come_from_the_file_the_environment_and_flags(
    environ: dict[str, str],
) -> None:
    text = "[limits]\nmax_tasks_per_user = 7\nmax_request_bytes = 4096\n"
    environ["STATUSD_LIMITS_MAX_ITEMS_PER_TASK"] = "20"
    environ["STATUSD_LIMITS_MAX_REQUEST_BYTES"] = "2048"
    config, _ = load(environ, text, limits_max_tasks_per_user="3")
    limits = config.limits
    assert (limits.max_tasks_per_user, limits.max_items_per_task) == (3, 20)
    assert limits.max_request_bytes == 2048  # the environment over the file


def test_limits_come_from_the_file_the_environment_and_flags(environ: dict[str, str]) -> None:
    text = "[limits]\nmax_batch_entries = 10\npublish_rate = 2\nmax_reply_bytes = 4096\n"
    environ["STATUSD_LIMITS_PUBLISH_BURST"] = "5"
    environ["STATUSD_LIMITS_MAX_REPLY_BYTES"] = "8192"
    config, _ = load(environ, text, limits_max_subscriptions_per_connection="3")
    assert config.limits == LimitsConfig(
        max_subscriptions_per_connection=3,
        max_batch_entries=10,
        max_reply_bytes=8192,
        publish_rate=2.0,
        publish_burst=5,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "max_subscriptions_per_connection = 0",
            "limits.max_subscriptions_per_connection: must be an integer from 1 to 1000000, not 0",
        ),
        ("max_batch_entries = true", "limits.max_batch_entries: must be an integer from 1"),
        (
            "max_reply_bytes = 16777217",
            "limits.max_reply_bytes: must be an integer from 1024 to 16777216, not 16777217",
        ),
        (
            "publish_rate = 0",
            "limits.publish_rate: must be a number of messages a second above 0 and at most"
            " 1000000, not 0",
        ),
        ('publish_rate = "fast"', "limits.publish_rate: must be a number of messages"),
        ("publish_burst = 0", "limits.publish_burst: must be an integer from 1 to 1000000, not 0"),
        (
            "status_user_share = 0",
            "limits.status_user_share: must be an integer from 1 to 100, not 0",
        ),
        (
            "status_user_share = 101",
            "limits.status_user_share: must be an integer from 1 to 100, not 101",
        ),
        (
            "max_connections_per_user = 0",
            "limits.max_connections_per_user: must be an integer from 1 to 1000000, not 0",
        ),
        (
            "admin_connections = -1",
            "limits.admin_connections: must be an integer from 0 to 1000000, not -1",
        ),
        (
            'max_pending_handshakes = "many"',
            'limits.max_pending_handshakes: must be an integer from 1 to 1000000, not "many"',
        ),
        (
            "max_tasks_per_user = 0",
            "limits.max_tasks_per_user: must be an integer from 1 to 1000000, not 0",
        ),
        (
            'max_items_per_task = "10"',
            'limits.max_items_per_task: must be an integer from 1 to 1000000, not "10"',
        ),
        (
            "max_request_bytes = 1023",
            "limits.max_request_bytes: must be an integer from 1024 to 16777216, not 1023",
        ),
        (
            "max_request_bytes = 16777217",
            "limits.max_request_bytes: must be an integer from 1024 to 16777216, not 16777217",
        ),
    ],
)
def test_bad_limits_are_refused(environ: dict[str, str], text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ, f"[limits]\n{text}\n")
    assert str(caught.value).startswith(expected)


def test_limits_keys_at_the_top_level_are_unknown(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"did you mean limits.max_batch_entries\?"):
        load(environ, "max_batch_entries = 10\n")


def test_render_config_round_trips_the_limits(tmp_path: Path, environ: dict[str, str]) -> None:
    environ["XDG_RUNTIME_DIR"] = str(tmp_path)
    (tmp_path / "statusd").mkdir()
    config, _ = load(environ)
    config = attrs.evolve(
        config,
        limits=LimitsConfig(
            7,
            8,
            9000,
            publish_rate=0.5,
            publish_burst=3,
            max_tasks_per_user=4,
            max_items_per_task=5,
            max_request_bytes=6000,
            status_user_share=40,
        ),
    )
    assert tomllib.loads(render_config(config))["limits"]["publish_rate"] == 0.5
    assert reload(config, tmp_path, environ).limits == config.limits
