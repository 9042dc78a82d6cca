"""`rdm serve`: run the Serve app of a config file (default: the local tiny-model config) until interrupted."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import threading
from pathlib import Path

from jobs.common import EXIT_OK, exit_codes, setup_logging
from rdm.errors import ConfigError

logger = logging.getLogger(__name__)
DEFAULT_CONFIG = Path("infra/serve/local.yaml")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdm serve", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="Serve config YAML")
    parser.add_argument("--host", help="bind address (default: the config's, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's, else 8000)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow serving off loopback without an API token (not recommended)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check_auth(host: str, specs, insecure: bool) -> None:
    """Never serve off loopback without a token unless explicitly told to."""
    if insecure or host in ("localhost",) or ipaddress.ip_address(host).is_loopback:
        return
    for spec in specs:
        if not (os.environ.get("RDM_API_TOKEN") or spec.args.api_token_file or spec.args.api_keys_file):
            raise ConfigError(f"refusing to serve {spec.name!r} on {host} without an API token: set RDM_API_TOKEN, "
                              "args.api_token_file or args.api_keys_file, or pass --insecure-no-auth")


@exit_codes
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from cluster.serve.config import read_serve_config

    http, specs = read_serve_config(args.config)
    host, port = args.host or http.get("host", "127.0.0.1"), args.port or http.get("port", 8000)
    check_auth(host, specs, args.insecure_no_auth)
    from ray import serve

    from cluster.runtime import connect
    from cluster.serve.app import build_app

    connect()
    serve.start(http_options={**http, "host": host, "port": port})  # request_timeout_s etc. as configured
    for spec in specs:
        serve.run(build_app(spec.args.model_dump(), spec.deployments), name=spec.name, route_prefix=spec.route_prefix)
    print(f"serving on http://{host}:{port}/ (Ctrl+C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    return EXIT_OK
