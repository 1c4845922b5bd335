"""`callplane` command line: `callplane serve [flags]`, `callplane token`, `callplane webhook verify`, and
the client commands for a terminal (`watch`, `events`, `get call`, `query calls|members`: cli_client.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import timedelta

from callplane_server import cli_client
from callplane_server import config as config_module
from callplane_server.auth.tokens import create_token, load_or_create_secret

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `7d` (a bare number is seconds)."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit else value
    try:
        return timedelta(seconds=float(number) * (unit or 1))
    except ValueError:
        raise SystemExit(f"callplane: bad duration {text!r}; use e.g. 30s, 15m, 1h, 7d") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callplane", description="Callplane gRPC control plane")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gRPC server")
    config_module.add_arguments(serve_parser)
    token_parser = commands.add_parser("token", help="print a bearer token signed with the configured secret")
    who = token_parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user token acting as this user id")
    who.add_argument("--server", action="store_true", help="a server token (may do everything)")
    token_parser.add_argument("--ttl", default="1h", help="lifetime, e.g. 30s, 15m, 1h, 7d (default 1h)")
    token_parser.add_argument("--call", action="append", dest="call_cids", help="limit a user token to a cid")
    token_parser.add_argument("--data-dir", help="where the development secret lives (default data)")
    token_parser.add_argument(
        "--api-secret-file", help="file holding the secret (CALLPLANE_API_SECRET[_FILE])"
    )
    webhook_parser = commands.add_parser("webhook", help="webhook helpers")
    webhook_commands = webhook_parser.add_subparsers(dest="webhook_command", required=True)
    verify_parser = webhook_commands.add_parser(
        "verify",
        help="check a received webhook request's signature with the endpoint's secret (exit 1 if it fails)",
    )
    verify_parser.add_argument("--secret", help="the endpoint's secret, whsec_... (or WEBHOOK_SECRET)")
    verify_parser.add_argument(
        "--headers-file", required=True, help="the request's headers: a JSON object or `Name: value` lines"
    )
    verify_parser.add_argument("--body-file", required=True, help="the request's body, byte for byte")
    cli_client.add_client_commands(commands)
    args = parser.parse_args(argv)

    if args.command in cli_client.CLIENT_COMMANDS:
        return cli_client.run_client_command(args)

    if args.command == "webhook":
        return _verify_webhook(args)

    if args.command == "token":
        config = config_module.load(args)
        secret = config.api_secret or load_or_create_secret(config.data_dir)
        ttl = parse_duration(args.ttl)
        print(create_token(secret, user_id=args.user, ttl=ttl, call_cids=args.call_cids))
        return 0

    if args.command == "serve":
        try:
            config = config_module.load(args)
        except ValueError as error:
            raise SystemExit(f"callplane: {error}") from None
        from callplane_server import logs

        logs.configure(config.log_level, config.log_format)
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        from callplane_server import runtime
        from callplane_server.app import serve

        runtime.run(serve(config))
        # Stopped cleanly: the database is closed and every RPC has ended. Skip the interpreter's teardown
        # (freeing every module and object took ~0.8 s, measured), so a rolling restart is not held up.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _verify_webhook(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime
    from pathlib import Path

    from callplane_server.webhooks.verification import parse_headers, verify_request

    secret = args.secret or os.environ.get("WEBHOOK_SECRET", "")
    if not secret:
        print("callplane: pass --secret whsec_... or set WEBHOOK_SECRET", file=sys.stderr)
        return 2
    try:
        headers = parse_headers(Path(args.headers_file).read_text())
        body = Path(args.body_file).read_bytes()
        result = verify_request(secret, headers, body)
    except (OSError, ValueError) as error:  # exit 2: not a verdict on the request (1 is "not verified")
        print(f"callplane: {error}", file=sys.stderr)
        return 2
    print(result.report(datetime.now(UTC)))
    return 0 if result.verified else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
