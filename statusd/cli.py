"""The ``statusd`` command: argv -> Config -> the daemon, and the exit status.

Only argument parsing and the start-up error path live here. The daemon and logging modules are
imported after the configuration is known to be good, so ``--version`` and ``--check-config``
never pay for (or depend on) the daemon's imports.
"""

from __future__ import annotations

import argparse
import sys

from statusd import __version__
from statusd.config import load_config, render_config
from statusd.errors import ConfigError

EXIT_OK = 0
EXIT_CONFIG = 2  # the same status argparse uses for a usage error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statusd",
        description="Run the statusd daemon in the foreground.",
        epilog="Settings also come from STATUSD_<KEY> environment variables and the TOML file; "
        "a flag wins over the environment, which wins over the file.",
    )
    parser.add_argument("--config", metavar="PATH", help="TOML config file to read")
    parser.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    parser.add_argument("--state-dir", metavar="DIR", help="where tasks and notifications are kept")
    parser.add_argument("--download-dir", metavar="DIR", help="where downloads go by default")
    parser.add_argument(
        "--websocket",
        metavar="HOST:PORT",
        dest="websocket_listen",
        help="also serve WebSocket clients here (off by default)",
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration, print the effective values and exit",
    )
    parser.add_argument("--version", action="version", version=f"statusd {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    flags = {
        "config": args.config,
        "socket": args.socket,
        "state_dir": args.state_dir,
        "download_dir": args.download_dir,
        "websocket_listen": args.websocket_listen,
        "log_level": args.log_level,
    }
    try:
        config = load_config(flags)
    except ConfigError as exc:
        # One line, always: systemd's journal and wrapper scripts show the first line only.
        message = " ".join(str(exc).splitlines())
        print(f"statusd: config error: {message}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        sys.stdout.write(render_config(config))
        return EXIT_OK

    from statusd import daemon, logs

    logs.setup_logging(config.log_level)
    # SIGHUP re-reads the configuration from the same flags, environment and file.
    return daemon.serve(config, reload=lambda: load_config(flags))
