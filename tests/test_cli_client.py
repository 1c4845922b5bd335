"""The `callplane` client commands (watch, events, get call, query calls|members) as a person runs them:
a real `callplane serve` subprocess, the CLI as a subprocess, and its printed lines checked. `watch` keeps
following across a server restart on the same port and data, printing each event once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from callplane.client import CallplaneClient
from callplane_server.auth.tokens import create_token
from tests.support import TEST_SECRET, callplane_command, fresh_database, serve_subprocess, serving_port

TOKEN = create_token(TEST_SECRET)


class Server:
    def __init__(self, data_dir: Path, database_url: str) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self._drainer: asyncio.Future[None] | None = None

    async def start(self) -> None:
        listen = ("--listen", f"127.0.0.1:{self.port}") if self.port else ()
        self.process = await serve_subprocess(
            self.data_dir, "--database-url", self.database_url, "--shutdown-grace", "1", *listen
        )
        self.port, _ = await serving_port(self.process)
        self._drainer = asyncio.ensure_future(self._drain(self.process))

    @staticmethod
    async def _drain(process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while await process.stderr.readline():
            pass

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)
            await asyncio.wait_for(self.process.wait(), timeout=30)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(backend: str, folder: Path) -> AsyncIterator[Server]:
    async with fresh_database(backend, folder) as url:
        server = Server(folder / "data", url)
        await server.start()
        try:
            yield server
        finally:
            await server.stop(signal.SIGKILL)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLPLANE_")}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "160", **extra}


async def run_cli(*args: str, env: dict[str, str] | None = None, within: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        callplane_command(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else cli_env(CALLPLANE_TOKEN=TOKEN),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=within)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Follower:
    """A running `callplane watch|events`, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []
        assert process.stderr is not None
        self._err_task = asyncio.ensure_future(self._read_err())

    async def _read_err(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.stderr.append(line.decode())

    async def line(self, within: float = 30) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout=within)
        assert raw, "the command ended; stderr:\n" + "".join(self.stderr)
        return raw.decode().rstrip("\n")

    async def noted(self, text: str, within: float = 10) -> None:
        """Waits for a line on stderr containing `text`."""

        async def seen() -> None:
            while not any(text in line for line in self.stderr):
                assert self.process.returncode is None, "".join(self.stderr)
                await asyncio.sleep(0.02)

        try:
            await asyncio.wait_for(seen(), timeout=within)
        except TimeoutError:
            raise AssertionError(f"no {text!r} on stderr:\n" + "".join(self.stderr)) from None

    async def lines(self, count: int) -> list[str]:
        return [await self.line() for _ in range(count)]

    async def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: exits 0; returns the exit code and whatever else it printed."""
        self.process.send_signal(signal.SIGINT)
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), timeout=30)
        code = await asyncio.wait_for(self.process.wait(), timeout=30)
        await self._err_task
        return code, rest.decode()


@asynccontextmanager
async def follow(*args: str) -> AsyncIterator[Follower]:
    process = await asyncio.create_subprocess_exec(
        callplane_command(),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(CALLPLANE_TOKEN=TOKEN),
    )
    follower = Follower(process)
    try:
        yield follower
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_watch_prints_events_as_they_happen_and_survives_a_restart(
    backend: str, tmp_path: Path
) -> None:
    async with serving(backend, tmp_path) as server:
        async with CallplaneClient(server.addr, token=TOKEN) as client:
            await client.upsert_users([{"id": "alice"}, {"id": "bob"}])
            call = client.call("default", "w1")
            await call.get_or_create(created_by_id="alice", custom={"topic": "x"})
            async with follow("watch", "default:w1", "--snapshot", "--addr", server.addr) as watch:
                snapshot = await watch.line()
                assert snapshot.startswith("snapshot seq=") and "default:w1" in snapshot
                await call.update(custom={"topic": "y", "mood": "ok"})
                updated = await watch.line()
                assert " seq=2 call.updated" in updated and "custom={mood,topic}" in updated
                await call.update_members(update_members=[{"user_id": "bob"}])
                added = await watch.line()
                assert " seq=3 call.member_added members=bob" in added

                # The server goes away and comes back on the same port and data: the watch resumes.
                await server.stop()
                await watch.noted("reconnecting")
                await server.start()
                async with CallplaneClient(server.addr, token=TOKEN) as again:
                    call = again.call("default", "w1")
                    await call.update(custom={"topic": "z"})
                    assert " seq=4 call.updated" in await watch.line()
                    await call.update_members(remove_members=["bob"])
                    assert " seq=5 call.member_removed" in await watch.line()
                await watch.noted("reconnected; resumed after seq 3")
                code, rest = await watch.interrupt()
                assert code == 0 and rest == ""  # nothing printed twice
                assert not any("Traceback" in line for line in watch.stderr), watch.stderr

        # --after-seq resumes exactly after it; --json prints proto3 JSON, one object per line.
        async with follow(
            "watch", "default:w1", "--after-seq", "2", "--json", "--addr", server.addr
        ) as watch:
            events = [json.loads(line) for line in await watch.lines(3)]
            assert [(e["seq"], e["type"]) for e in events] == [
                ("3", "call.member_added"),
                ("4", "call.updated"),
                ("5", "call.member_removed"),
            ]
            assert events[0]["callMemberAdded"]["members"][0]["userId"] == "bob"
            code, rest = await watch.interrupt()
            assert code == 0 and rest == ""


async def test_events_firehose_with_filters(backend: str, tmp_path: Path) -> None:
    async with serving(backend, tmp_path) as server, CallplaneClient(server.addr, token=TOKEN) as client:
        args = ("events", "--cid", "default:e1", "--event-type", "call.updated", "--addr", server.addr)
        async with follow(*args) as events:
            await events.noted("following from position")  # subscribed: changes from here on are seen
            await client.call("default", "e1").get_or_create()
            await client.call("default", "other").get_or_create()
            await client.call("default", "other").update(custom={"a": 1})
            await client.call("default", "e1").update(custom={"b": 1})
            line = await events.line()
            assert "default:e1 call.updated custom={b}" in line and " position=" in line
            code, rest = await events.interrupt()
            assert code == 0 and rest == ""  # the other call and event types were filtered out

        # From a position, as JSON: every event since, in position order.
        async with follow("events", "--after-position", "0", "--json", "--addr", server.addr) as events:
            seen = [json.loads(line) for line in await events.lines(4)]
            assert [e["callCid"] for e in seen] == [
                "default:e1",
                "default:other",
                "default:other",
                "default:e1",
            ]
            positions = [int(e["position"]) for e in seen]
            assert positions == sorted(positions) and len(set(positions)) == 4
            await events.interrupt()


async def test_get_and_query(backend: str, tmp_path: Path) -> None:
    async with serving(backend, tmp_path) as server, CallplaneClient(server.addr, token=TOKEN) as client:
        await client.upsert_users([{"id": name} for name in ("ann", "user1", "user2", "user3")])
        for number in (1, 2, 3):
            call = client.call("default", f"q{number}")
            await call.get_or_create(custom={"n": number})
            await call.update_members(
                update_members=[{"user_id": "ann"}, {"user_id": f"user{number}", "role": "host"}]
            )
        addr = ("--addr", server.addr)

        code, out, err = await run_cli("get", "call", "default:q2", *addr)
        assert code == 0, err
        assert "call default:q2" in out and "ann" in out and "user2" in out and '{"n": 2}' in out

        code, out, err = await run_cli("get", "call", "default:q2", "--json", *addr)
        state = json.loads(out)
        assert state["call"]["cid"] == "default:q2" and {m["userId"] for m in state["members"]} == {
            "ann",
            "user2",
        }

        code, out, err = await run_cli("query", "calls", "--sort", "custom.n:desc:number", "--json", *addr)
        assert code == 0, err
        assert [json.loads(line)["call"]["cid"] for line in out.splitlines()] == [
            "default:q3",
            "default:q2",
            "default:q1",
        ]
        code, out, err = await run_cli(
            "query", "calls", "--filter", '{"custom.n": {"$gte": 2}}', "--sort", "custom.n:asc:number", *addr
        )
        assert code == 0, err
        rows = [line for line in out.splitlines() if "default:q" in line]
        assert ["default:q2" in rows[0], "default:q3" in rows[1], len(rows)] == [True, True, 2]

        code, out, err = await run_cli(
            "query", "members", "default:q1", "--filter", '{"role": "host"}', "--json", *addr
        )
        assert code == 0, err
        assert [json.loads(line)["userId"] for line in out.splitlines()] == ["user1"]
        code, out, err = await run_cli("query", "members", "default:q1", "--sort", "user_id:desc", *addr)
        assert code == 0, err
        assert out.index("user1") < out.index("ann")

        # No token given: a server token minted from the development secret in --data-dir.
        folder = tmp_path / "secret"
        folder.mkdir()
        (folder / "api_secret").write_text(TEST_SECRET)
        env = cli_env()
        code, out, err = await run_cli(
            "get", "call", "default:q1", "--json", "--data-dir", str(folder), *addr, env=env
        )
        assert code == 0, err
        assert json.loads(out)["call"]["cid"] == "default:q1"


async def test_errors_are_one_line(backend: str, tmp_path: Path) -> None:
    async with serving(backend, tmp_path) as server:
        addr = ("--addr", server.addr)
        code, out, err = await run_cli("get", "call", "default:missing", *addr)
        assert code == 1 and out == ""
        assert (
            err.strip()
            == "callplane: NOT_FOUND: call 'default:missing' does not exist (reason CALL_NOT_FOUND)"
        )

        code, out, err = await run_cli("watch", "no-colon", *addr)
        assert code == 2 and "bad call id 'no-colon'" in err and len(err.strip().splitlines()) == 1

        code, out, err = await run_cli("query", "calls", "--filter", "{nope", *addr)
        assert code == 2 and "--filter is not JSON" in err

        code, out, err = await run_cli("get", "call", "default:x", *addr, env=cli_env(CALLPLANE_TOKEN="junk"))
        assert code == 1 and err.startswith("callplane: UNAUTHENTICATED") and "Traceback" not in err

        code, out, err = await run_cli(
            "get", "call", "default:x", "--data-dir", str(tmp_path / "none"), *addr, env=cli_env()
        )
        assert code == 2 and "no token" in err

    # No server at all: one line, UNAVAILABLE (the client's own retries give up first).
    code, out, err = await run_cli(
        "query", "calls", "--addr", "127.0.0.1:1", env=cli_env(CALLPLANE_TOKEN=TOKEN)
    )
    assert code == 1 and err.startswith("callplane: UNAVAILABLE") and len(err.strip().splitlines()) == 1
