"""The client half of the `callplane` command line, for people at a terminal: `watch`, `events`, `get call`,
`query calls`, `query members`. Built on the project's Python client (`callplane.client`): its event
streams reconnect after a dropped connection and resume exactly after the last seq (position) seen, so a
server restart under `callplane watch` prints nothing twice and misses nothing. Output is one readable line
per event (or, with `--json`, the event's proto3 JSON, one object per line); tables use `rich`.

Server address and token: `--addr` / CALLPLANE_ADDR (default 127.0.0.1:50051), `--token` /
CALLPLANE_TOKEN, else a server token minted from the server's secret (CALLPLANE_API_SECRET[_FILE], or the
development secret in `--data-dir`, default `data`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

DEFAULT_ADDR = "127.0.0.1:50051"
#: The subcommands this module adds.
CLIENT_COMMANDS = frozenset({"watch", "events", "get", "query"})


class CliError(Exception):
    """A problem to report in one line on stderr (exit 2): bad arguments, no token."""


def add_client_commands(commands: Any) -> None:
    """Adds `watch`, `events`, `get` and `query` to the `callplane` subcommands."""

    def connection(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--addr", help=f"server host:port (CALLPLANE_ADDR; default {DEFAULT_ADDR})")
        parser.add_argument(
            "--token",
            help="bearer token (CALLPLANE_TOKEN; default: a server token minted from the server's secret)",
        )
        parser.add_argument("--data-dir", help="where the development secret lives (default data)")
        parser.add_argument("--api-secret-file", help="file holding the secret (CALLPLANE_API_SECRET[_FILE])")
        parser.add_argument("--json", action="store_true", help="print proto3 JSON instead of text")

    watch = commands.add_parser("watch", help="follow a call's events, one line each (like kubectl get -w)")
    watch.add_argument("cid", metavar="TYPE:ID", help="the call, e.g. default:123")
    start = watch.add_mutually_exclusive_group()
    start.add_argument("--after-seq", type=int, help="start exactly after this seq (0: first retained)")
    start.add_argument("--snapshot", action="store_true", help="print the call's state first")
    connection(watch)

    events = commands.add_parser("events", help="follow the event firehose over all calls, filtered")
    events.add_argument("--call-type", action="append", dest="call_types", help="only this call type")
    events.add_argument("--cid", action="append", dest="call_cids", help="only this call (TYPE:ID)")
    events.add_argument("--event-type", action="append", dest="event_types", help="e.g. call.updated")
    events.add_argument("--after-position", type=int, help="start exactly after this global position")
    connection(events)

    get = commands.add_parser("get", help="read one thing")
    get_commands = get.add_subparsers(dest="get_command", required=True)
    get_call = get_commands.add_parser("call", help="a call and its members")
    get_call.add_argument("cid", metavar="TYPE:ID")
    get_call.add_argument("--members-limit", type=int, default=25, help="members to show (default 25)")
    connection(get_call)

    query = commands.add_parser("query", help="find calls or members")
    query_commands = query.add_subparsers(dest="query_command", required=True)
    calls = query_commands.add_parser("calls", help="find calls")
    members = query_commands.add_parser("members", help="find a call's members")
    members.add_argument("cid", metavar="TYPE:ID")
    for parser in (calls, members):
        parser.add_argument("--filter", help="filter conditions, JSON, e.g. '{\"ongoing\": true}'")
        parser.add_argument(
            "--sort",
            action="append",
            help="field[:asc|desc][:TYPE], repeatable, e.g. created_at:desc or custom.n:asc:number",
        )
        parser.add_argument("--limit", type=int, help="page size")
        parser.add_argument("--next", help="the page after this cursor")
        connection(parser)


def run_client_command(args: argparse.Namespace) -> int:
    """Runs a client command; a failed RPC or bad input prints one line to stderr and exits non-zero."""
    from callplane.client import CallplaneError

    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 0
    except CallplaneError as error:
        print(_describe_error(error), file=sys.stderr)
        return 1
    except CliError as error:
        print(f"callplane: {error}", file=sys.stderr)
        return 2


def _describe_error(error: Any) -> str:
    line = f"callplane: {error.code.name}: {error.message}"
    if error.reason:
        line += f" (reason {error.reason})"
    for path, description in error.field_violations:
        if description not in error.message:
            line += f"; {path}: {description}"
    return line


def _token(args: argparse.Namespace) -> str:
    token = args.token or os.environ.get("CALLPLANE_TOKEN", "")
    if token:
        return str(token)
    from callplane_server import config as config_module
    from callplane_server.auth.tokens import SECRET_FILE_NAME, create_token

    config = config_module.load(
        argparse.Namespace(data_dir=args.data_dir, api_secret_file=args.api_secret_file)
    )
    secret = config.api_secret
    if not secret:
        path = config.data_dir / SECRET_FILE_NAME
        if not path.exists():
            raise CliError(
                f"no token: pass --token or set CALLPLANE_TOKEN (no development secret at {path}; "
                "use --data-dir to point at the server's data folder)"
            )
        secret = path.read_text().strip()
    return create_token(secret, ttl=timedelta(hours=12))


def _split_cid(cid: str) -> tuple[str, str]:
    call_type, colon, call_id = cid.partition(":")
    if not colon or not call_type or not call_id:
        raise CliError(f"bad call id {cid!r}: expected TYPE:ID, e.g. default:123")
    return call_type, call_id


def _json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message), separators=(",", ":"))


async def _main(args: argparse.Namespace) -> int:
    from callplane.client import CallplaneClient

    addr = args.addr or os.environ.get("CALLPLANE_ADDR") or DEFAULT_ADDR
    if args.command == "watch":
        _split_cid(args.cid)  # before minting a token: a bad cid is the first thing to say
    async with CallplaneClient(addr, token=_token(args)) as client:
        handler: Callable[[Any, argparse.Namespace], Awaitable[int]]
        if args.command in ("watch", "events"):
            handler = _watch if args.command == "watch" else _events
            return await _until_interrupted(handler(client, args))
        if args.command == "get":
            return await _get_call(client, args)
        return await (_query_calls if args.query_command == "calls" else _query_members)(client, args)


async def _until_interrupted(follow: Awaitable[int]) -> int:
    """Runs a follow command until it ends or Ctrl-C / SIGTERM, which exit 0 quietly."""
    task = asyncio.ensure_future(follow)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return 0


class _Printer:
    """Prints stream messages as text or JSON lines, flushing each (a pipe sees them at once)."""

    def __init__(self, as_json: bool, key: str) -> None:
        self.as_json = as_json
        self.key = key

    def snapshot(self, message: Any) -> None:
        if self.as_json:
            print(json.dumps({"snapshot": json_format.MessageToDict(message.proto)}, separators=(",", ":")))
        else:
            call = message.call
            members = ", ".join(m.user_id for m in message.members) or "-"
            print(
                f"snapshot seq={message.seq} {call.cid} ongoing={str(call.ongoing).lower()} "
                f"members={call.member_count} [{members}]"
                + (f" custom={_keys(call.custom)}" if call.custom else "")
            )
        sys.stdout.flush()

    def event(self, message: Any) -> None:
        if self.as_json:
            print(_json(message.proto))
        else:
            at = message.created_at.strftime("%H:%M:%S.%f")[:-3] if message.created_at else "-"
            number = message.seq if self.key == "seq" else message.position
            cid = "" if self.key == "seq" else f" {message.call_cid}"
            summary = summarize(message.proto)
            print(f"{at} {self.key}={number}{cid} {message.type}" + (f" {summary}" if summary else ""))
        sys.stdout.flush()


def _keys(custom: Any) -> str:
    return "{" + ",".join(sorted(custom)) + "}"


def summarize(event: Any) -> str:
    """A short human summary of an event's payload: member ids, participant, custom keys, and so on."""
    kind = event.WhichOneof("payload")
    if not kind:
        return ""
    payload = getattr(event, kind)
    parts: list[str] = []
    fields = {f.name for f, _ in payload.ListFields()}
    if "members" in fields:
        parts.append("members=" + ",".join(m.user_id for m in payload.members))
    if "user_ids" in fields:
        parts.append("user_ids=" + ",".join(payload.user_ids))
    if "participant" in fields:
        participant = payload.participant
        parts.append(f"user={participant.user_id} session={participant.participant_session_id}")
    if "user_id" in fields:
        parts.append(f"user={payload.user_id}")
    if "call" in fields:
        call = payload.call
        if call.custom.fields:
            parts.append("custom=" + _keys(call.custom.fields))
        if call.ended_at.seconds:
            parts.append("ended")
    if "custom" in fields:
        parts.append("custom=" + _keys(payload.custom.fields))
    for name in ("reason", "session_id"):
        if name in fields:
            parts.append(f"{name}={getattr(payload, name)}")
    return " ".join(parts)


def _note(text: str) -> None:
    print(f"callplane: {text}", file=sys.stderr, flush=True)


def _announce_reconnects(stream: Any, key: str) -> asyncio.Task[None]:
    """Says on stderr, once per outage, that the stream lost its connection and is reconnecting, and that
    it is back once connected again (the client's stream reconnects and resumes by itself, silently)."""

    async def watch() -> None:
        seen = 0
        lost = False
        resume_point: Any = None
        while True:
            await asyncio.sleep(0.1)
            if stream.reconnects > seen:
                seen = stream.reconnects
                if not lost:
                    lost, resume_point = True, stream.cursor
                    _note(f"connection lost; reconnecting (to resume after {key} {resume_point})")
            elif lost and stream.connected:
                lost = False
                _note(f"reconnected; resumed after {key} {resume_point}")

    return asyncio.ensure_future(watch())


async def _watch(client: Any, args: argparse.Namespace) -> int:
    from callplane.client import Reconnect

    call_type, call_id = _split_cid(args.cid)
    stream = client.call(call_type, call_id).watch(
        snapshot=args.snapshot,
        after_seq=args.after_seq,
        reconnect=Reconnect(give_up_after=None),
    )
    return await _follow_announcing(stream, _Printer(args.json, "seq"))


async def _events(client: Any, args: argparse.Namespace) -> int:
    from callplane.client import Reconnect

    for cid in args.call_cids or []:
        _split_cid(cid)
    stream = client.subscribe_events(
        call_types=args.call_types,
        call_cids=args.call_cids,
        event_types=args.event_types,
        after_position=args.after_position,
        reconnect=Reconnect(give_up_after=None),
    )
    return await _follow_announcing(stream, _Printer(args.json, "position"))


async def _follow_announcing(stream: Any, printer: _Printer) -> int:
    from callplane.client import CallSnapshotMessage, EventMessage, ProgressMessage

    announcer = _announce_reconnects(stream, printer.key)
    started = False
    try:
        async with stream:
            async for message in stream:
                if isinstance(message, ProgressMessage):
                    # A stream started from now says where that is, once: tell the person (on stderr).
                    if not started:
                        _note(f"following from {printer.key} {message.seq}")
                    started = True
                elif isinstance(message, CallSnapshotMessage):
                    printer.snapshot(message)
                elif isinstance(message, EventMessage):
                    printer.event(message)
    finally:
        announcer.cancel()
    return 0


# get / query


def _parse_filter(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise CliError(f"--filter is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise CliError("--filter must be a JSON object")
    return value


def _parse_sort(values: list[str] | None) -> list[dict[str, Any]] | None:
    if not values:
        return None
    sort: list[dict[str, Any]] = []
    for value in values:
        field, _, rest = value.partition(":")
        direction, _, sort_type = rest.partition(":")
        direction = direction.lower() or "asc"
        if direction not in ("asc", "desc") or sort_type.lower() not in ("", "number", "string", "boolean"):
            raise CliError(f"bad --sort {value!r}: use field[:asc|desc][:number|string|boolean]")
        param: dict[str, Any] = {"field": field, "direction": direction}
        if sort_type:
            param["type"] = sort_type.lower()
        sort.append(param)
    return sort


def _custom_json(custom: Any) -> str:
    """Custom data as compact JSON, whole numbers without `.0` (a Struct holds every number as a double)."""

    def plain(value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    return json.dumps(plain(dict(custom)), sort_keys=True)


def _when(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def _console() -> Any:
    from rich.console import Console

    return Console(width=max(100, int(os.environ.get("COLUMNS", "0") or 0)), highlight=False)


async def _get_call(client: Any, args: argparse.Namespace) -> int:
    call_type, call_id = _split_cid(args.cid)
    state = await client.call(call_type, call_id).get(members_limit=args.members_limit)
    if args.json:
        print(_json(state.proto))
        return 0
    from rich.table import Table

    call = state.call
    table = Table(title=f"call {call.cid}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("cid", call.cid),
        ("created_by", call.created_by_user_id or "-"),
        ("team", call.team or "-"),
        ("ongoing", str(call.ongoing).lower()),
        ("backstage", str(call.backstage).lower()),
        ("members", str(call.member_count)),
        ("created_at", _when(call.created_at)),
        ("updated_at", _when(call.updated_at)),
        ("starts_at", _when(call.starts_at)),
        ("ended_at", _when(call.ended_at)),
        ("etag", call.etag),
        ("custom", _custom_json(call.custom) if call.custom else "{}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console = _console()
    console.print(table)
    if state.members:
        console.print(_members_table(state.members, f"members ({len(state.members)} shown)"))
    return 0


def _members_table(members: list[Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("user_id", "role", "created_at", "custom"):
        table.add_column(column)
    for member in members:
        custom = _custom_json(member.custom) if member.custom else ""
        table.add_row(member.user_id, member.role or "-", _when(member.created_at), custom)
    return table


def _print_page_json(page: Any, items_field: str) -> None:
    for item in getattr(page.proto, items_field):
        print(_json(item))


async def _query_calls(client: Any, args: argparse.Namespace) -> int:
    page = await client.query_calls(
        filter_conditions=_parse_filter(args.filter),
        sort=_parse_sort(args.sort),
        limit=args.limit,
        next=args.next,
    )
    if args.json:
        _print_page_json(page, "calls")
        return 0
    from rich.table import Table

    table = Table(title=f"calls ({len(page.items)})")
    for column in ("cid", "ongoing", "members", "created_at", "ended_at", "custom"):
        table.add_column(column)
    for state in page.items:
        call = state.call
        custom = _custom_json(call.custom) if call.custom else ""
        table.add_row(
            call.cid,
            str(call.ongoing).lower(),
            str(call.member_count),
            _when(call.created_at),
            _when(call.ended_at),
            custom,
        )
    console = _console()
    console.print(table)
    if page.next:
        console.print(f"next page: --next {page.next}")
    return 0


async def _query_members(client: Any, args: argparse.Namespace) -> int:
    call_type, call_id = _split_cid(args.cid)
    page = await client.call(call_type, call_id).query_members(
        filter_conditions=_parse_filter(args.filter),
        sort=_parse_sort(args.sort),
        limit=args.limit,
        next=args.next,
    )
    if args.json:
        _print_page_json(page, "members")
        return 0
    console = _console()
    console.print(_members_table(page.items, f"members of {args.cid} ({len(page.items)})"))
    if page.next:
        console.print(f"next page: --next {page.next}")
    return 0
