"""`callplane` command line: `callplane serve [flags]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from callplane_server import config as config_module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="callplane", description="Callplane gRPC control plane")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gRPC server")
    config_module.add_arguments(serve_parser)
    args = parser.parse_args(argv)

    if args.command == "serve":
        config = config_module.load(args)
        logging.basicConfig(
            level=getattr(logging, config.log_level, logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
            stream=sys.stderr,
        )
        logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
        from callplane_server.app import serve

        asyncio.run(serve(config))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
