"""The server around the services: health, reflection, graceful shutdown, configuration, error mapping and
database outages."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import asyncpg
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy.engine import URL, make_url

from callplane.v1 import (
    call_service_pb2,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
)
from callplane_server import config as config_module
from callplane_server import errors
from callplane_server.api.errors import status_code_for
from callplane_server.services.limits import Limits
from tests.errors import expect_error
from tests.support import TEST_SECRET, RunningServer, fresh_database, running_server, struct
from tests.support import channel as authed_channel

SERVICES = ("callplane.v1.CallTypeService", "callplane.v1.UserService", "callplane.v1.CallService")
REPO = Path(__file__).resolve().parent.parent


# --- health and reflection ----------------------------------------------------------------------------


async def test_health_serving(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", *SERVICES):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="callplane.v1.NoSuchService"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def list_services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        return [service.name for service in response.list_services_response.service]
    raise AssertionError("no reflection response")


async def test_reflection_lists_the_services(server):
    names = await list_services(server.channel)
    assert set(SERVICES) <= set(names)
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_reflection_serves_file_descriptors(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(file_containing_symbol="callplane.v1.CallService")

    async for response in stub.ServerReflectionInfo(requests()):
        assert response.file_descriptor_response.file_descriptor_proto
        break


async def test_reflection_can_be_disabled(backend, tmp_path):
    async with running_server(backend, tmp_path, reflection=False) as running:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_services(running.channel)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(running.channel)
        assert (
            await health.Check(health_pb2.HealthCheckRequest())
        ).status == health_pb2.HealthCheckResponse.SERVING


# --- graceful shutdown --------------------------------------------------------------------------------


async def test_graceful_stop_reports_not_serving(backend, tmp_path):
    async with running_server(backend, tmp_path) as running:
        health = health_pb2_grpc.HealthStub(running.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="callplane.v1.CallService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(running.server.stop(grace=1.0))
        try:
            second = await asyncio.wait_for(watch.read(), timeout=5)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            await stopping
        # After the stop nothing is served any more.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sigterm_drains_and_exits(backend, tmp_path):
    """`callplane serve` as a process: flags and environment, health, SIGTERM → NOT_SERVING → exit 0."""
    async with fresh_database(backend, tmp_path) as url:
        env = {
            **os.environ,
            "CALLPLANE_DATABASE_URL": url,
            "CALLPLANE_LISTEN": "127.0.0.1:1",  # the flag below wins
            "CALLPLANE_LOG_LEVEL": "info",
            "CALLPLANE_API_SECRET": TEST_SECRET,
            "PYTHONPATH": os.pathsep.join(
                [str(REPO / "server"), str(REPO / "clients" / "python"), str(REPO)]
            ),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callplane_server",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--shutdown-grace",
            "2",
            env=env,
            stderr=asyncio.subprocess.PIPE,
            cwd=tmp_path,
        )
        try:
            port = None
            log: list[str] = []
            while port is None:
                line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
                assert line, f"server exited early: {''.join(log)}"
                log.append(line.decode())
                match = re.search(r"serving on port (\d+)", log[-1])
                if match:
                    port = int(match.group(1))
            async with authed_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                watch = health.Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                types = call_type_service_pb2_grpc.CallTypeServiceStub(channel)
                listed = await types.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
                assert "default" in [t.name for t in listed.call_types]
                process.send_signal(signal.SIGTERM)
                update = await asyncio.wait_for(watch.read(), timeout=10)
                assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            rest = await asyncio.wait_for(process.stderr.read(), timeout=30)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
            assert "stopped" in rest.decode()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


# --- configuration ------------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config_module.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_config_defaults():
    config = config_module.load(parse(), environ={})
    assert config.listen == "127.0.0.1:50051"
    assert config.reflection is True
    assert config.shutdown_grace_seconds == 10.0
    assert config.log_level == "INFO"
    assert config.limits == Limits(16_384, 5_120, 5_120)
    assert config.database_url == ""
    assert config.resolved_database_url == f"sqlite:///{(Path('data') / 'callplane.db').resolve()}"
    assert config.min_progress_interval_seconds == 1.0


def test_config_from_environment():
    environ = {
        "CALLPLANE_LISTEN": "0.0.0.0:7000",
        "CALLPLANE_DATA_DIR": "/var/lib/callplane",
        "CALLPLANE_DATABASE_URL": "postgresql://db/callplane",
        "CALLPLANE_REFLECTION": "0",
        "CALLPLANE_SHUTDOWN_GRACE_SECONDS": "3.5",
        "CALLPLANE_LOG_LEVEL": "debug",
        "CALLPLANE_MAX_CALL_CUSTOM_BYTES": "1000",
        "CALLPLANE_MAX_MEMBER_CUSTOM_BYTES": "200",
        "CALLPLANE_MAX_USER_CUSTOM_BYTES": "300",
        "CALLPLANE_MIN_PROGRESS_INTERVAL_SECONDS": "0.5",
    }
    config = config_module.load(parse(), environ=environ)
    assert config.listen == "0.0.0.0:7000"
    assert config.data_dir == Path("/var/lib/callplane")
    assert config.resolved_database_url == "postgresql://db/callplane"
    assert config.reflection is False
    assert config.shutdown_grace_seconds == 3.5
    assert config.log_level == "DEBUG"
    assert config.limits == Limits(1000, 200, 300)
    assert config.min_progress_interval_seconds == 0.5
    assert config_module.load(None, environ={"CALLPLANE_DATA_DIR": "/d"}).resolved_database_url == (
        "sqlite:////d/callplane.db"
    )


def test_flags_win_over_environment():
    environ = {
        "CALLPLANE_LISTEN": "0.0.0.0:7000",
        "CALLPLANE_REFLECTION": "1",
        "CALLPLANE_MAX_USER_CUSTOM_BYTES": "300",
        "CALLPLANE_LOG_LEVEL": "debug",
        "CALLPLANE_MIN_PROGRESS_INTERVAL_SECONDS": "0.5",
    }
    args = parse(
        "--listen",
        "127.0.0.1:9000",
        "--no-reflection",
        "--max-user-custom-bytes",
        "64",
        "--shutdown-grace",
        "1",
        "--log-level",
        "warning",
        "--database-url",
        "sqlite:///x.db",
        "--min-progress-interval",
        "2.5",
    )
    config = config_module.load(args, environ=environ)
    assert config.listen == "127.0.0.1:9000"
    assert config.reflection is False
    assert config.limits.max_user_custom_bytes == 64
    assert config.limits.max_call_custom_bytes == 16_384
    assert config.shutdown_grace_seconds == 1.0
    assert config.log_level == "WARNING"
    assert config.database_url == "sqlite:///x.db"
    assert config.min_progress_interval_seconds == 2.5


async def test_configured_limits_apply(backend, tmp_path):
    limits = Limits(max_call_custom_bytes=100, max_member_custom_bytes=50, max_user_custom_bytes=60)
    async with running_server(backend, tmp_path, limits=limits) as running:
        from google.protobuf import struct_pb2

        from callplane.v1 import call_service_pb2_grpc

        calls = call_service_pb2_grpc.CallServiceStub(running.channel)
        users = user_pb2_grpc.UserServiceStub(running.channel)
        custom = struct_pb2.Struct()
        custom.update({"k": "x" * 93})  # 101 bytes
        details = await expect_error(
            calls.GetOrCreateCall(
                call_service_pb2.GetOrCreateCallRequest(
                    type="default", id="c", data=call_service_pb2.CallData(custom=custom)
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["data.custom"],
        )
        assert "100" in details.violations[0].description
        user_custom = struct_pb2.Struct()
        user_custom.update({"k": "x" * 53})  # 61 bytes
        await expect_error(
            users.UpsertUsers(
                user_pb2.UpsertUsersRequest(users=[user_pb2.UserRequest(id="u", custom=user_custom)])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            fields=["users[0].custom"],
        )


# --- error mapping ------------------------------------------------------------------------------------


def test_every_domain_error_has_a_specific_code():
    expected = {
        errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        errors.NotFound: grpc.StatusCode.NOT_FOUND,
        errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        errors.Aborted: grpc.StatusCode.ABORTED,
        errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
        errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
        errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
        errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    subclasses = set(errors.CallplaneError.__subclasses__())
    assert subclasses == set(expected), "a new error class needs a status code"
    for cls, code in expected.items():
        assert status_code_for(cls("x")) == code
    assert status_code_for(errors.CallplaneError("x")) == grpc.StatusCode.INTERNAL


async def test_unexpected_exception_is_internal_not_unknown(backend, tmp_path, monkeypatch):
    from callplane_server.services.call_types import CallTypeService

    async def boom(self):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(CallTypeService, "list", boom)
    async with running_server(backend, tmp_path) as running:
        stub = call_type_service_pb2_grpc.CallTypeServiceStub(running.channel)
        details = await expect_error(
            stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest()),
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
        )
        assert "secret internals" not in details.message
        # The server keeps working afterwards.
        assert (
            await stub.GetCallType(call_type_service_pb2.GetCallTypeRequest(name="default"))
        ).call_type.name


async def test_domain_errors_are_never_unknown(server, calls, users, call_types, unique):
    """A sample of failures from every service: each has a specific code and a callplane ErrorInfo."""
    failures = [
        (
            calls.GetCall(call_service_pb2.GetCallRequest(type="default", id=unique("c"))),
            grpc.StatusCode.NOT_FOUND,
        ),
        (calls.GetCall(call_service_pb2.GetCallRequest()), grpc.StatusCode.INVALID_ARGUMENT),
        (users.DeleteUsers(user_pb2.DeleteUsersRequest(user_ids=[unique("u")])), grpc.StatusCode.NOT_FOUND),
        (
            call_types.CreateCallType(call_type_service_pb2.CreateCallTypeRequest(name="default")),
            grpc.StatusCode.ALREADY_EXISTS,
        ),
        (calls.QueryCalls(call_service_pb2.QueryCallsRequest(next="x")), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for awaitable, code in failures:
        await expect_error(awaitable, code)


# --- database outage ----------------------------------------------------------------------------------


async def _admin_connection(running: RunningServer) -> tuple[URL, asyncpg.Connection]:
    """The server's database URL, and a connection to the `postgres` database to act on it from."""
    url = make_url(running.server.config.database_url)
    admin = await asyncpg.connect(
        url.set(drivername="postgresql", database="postgres").render_as_string(False)
    )
    return url, admin


async def test_database_dropped_under_a_running_server_is_unavailable(backend, tmp_path):
    if backend != "postgres":
        pytest.skip("needs a database server to take away")
    async with running_server(backend, tmp_path) as running:
        stub = call_type_service_pb2_grpc.CallTypeServiceStub(running.channel)
        await stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
        url, admin = await _admin_connection(running)
        try:
            await admin.execute(f'DROP DATABASE "{url.database}" WITH (FORCE)')
        finally:
            await admin.close()
        details = await expect_error(
            stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest(), timeout=30),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert details.reason == "DATABASE_UNAVAILABLE"


async def test_database_refusing_connections_is_unavailable(backend, tmp_path):
    """ALTER DATABASE ... ALLOW_CONNECTIONS false: new connections fail with SQLSTATE 55000."""
    if backend != "postgres":
        pytest.skip("needs a database server to refuse connections")
    async with running_server(backend, tmp_path) as running:
        stub = call_type_service_pb2_grpc.CallTypeServiceStub(running.channel)
        await stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
        url, admin = await _admin_connection(running)
        try:
            await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false')
            # The server's pooled connections go too, so its next query has to connect anew.
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", url.database
            )
            details = await expect_error(
                stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest(), timeout=30),
                grpc.StatusCode.UNAVAILABLE,
                "DATABASE_UNAVAILABLE",
            )
            assert "retry" in details.message
        finally:
            # Let the database be dropped afterwards.
            await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true')
            await admin.close()
        # Back to normal once connections are allowed again.
        await stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest(), timeout=30)


async def test_sqlite_full_names_the_cause(backend, tmp_path):
    """SQLITE_FULL ("database or disk is full", here from a real SQLite file capped by max_page_count, as
    a full disk would): UNAVAILABLE with reason STORAGE_FULL and a message saying so, not a bare outage."""
    if backend != "sqlite":
        pytest.skip("SQLite's page cap; PostgreSQL's disk_full is the next test")
    async with running_server(backend, tmp_path) as running:
        users = user_pb2_grpc.UserServiceStub(running.channel)
        async with running.server.store.database.write_engine.connect() as connection:
            # The writer's only connection (max_page_count is per connection): no page beyond today's.
            pages = (await connection.exec_driver_sql("PRAGMA page_count")).scalar_one()
            await connection.exec_driver_sql(f"PRAGMA max_page_count = {pages}")
            await connection.commit()
        many = [
            user_pb2.UserRequest(id=f"filler-{index}", custom=struct({"blob": "x" * 3000}))
            for index in range(50)
        ]
        details = await expect_error(
            users.UpsertUsers(user_pb2.UpsertUsersRequest(users=many)),
            grpc.StatusCode.UNAVAILABLE,
            "STORAGE_FULL",
        )
        assert "no space left on device" in details.message


async def test_sqlite_full_disk_fails_every_write_of_its_group(backend, tmp_path):
    """SQLite rolls the whole transaction back on SQLITE_FULL. Writes grouped into one commit with the one
    that filled the disk are lost with it, so none of them may be acknowledged (before: the small write
    was answered as committed although SQLite had rolled it back)."""
    if backend != "sqlite":
        pytest.skip("SQLite's group commit")
    from sqlalchemy import text

    from callplane_server.store import Store

    async with fresh_database(backend, tmp_path) as url:
        store = await Store.open(url)
        try:
            await store.database.run(
                lambda session: session.execute(text("CREATE TABLE notes (body TEXT)")), write=True
            )
            async with store.database.write_engine.connect() as connection:
                pages = (await connection.exec_driver_sql("PRAGMA page_count")).scalar_one()
                await connection.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")
                await connection.commit()

            async def small(session):
                await session.execute(text("INSERT INTO notes VALUES ('small')"))

            async def huge(session):
                await session.execute(text("INSERT INTO notes VALUES (:body)"), {"body": "x" * 100_000})

            # Started together, the two writes share one group (and one transaction).
            outcomes = await asyncio.gather(
                store.database.run(small, write=True),
                store.database.run(huge, write=True),
                return_exceptions=True,
            )
            for outcome in outcomes:
                assert isinstance(outcome, errors.Unavailable), outcome
                assert outcome.reason == "STORAGE_FULL", outcome.message

            async def count(session):
                return (await session.execute(text("SELECT count(*) FROM notes"))).scalar_one()

            assert await store.database.run(count, write=False) == 0
        finally:
            await store.close()


async def test_postgres_disk_full_names_the_cause(backend, tmp_path):
    """A real PostgreSQL error with SQLSTATE 53100 (disk_full) through the store's transaction runner."""
    if backend != "postgres":
        pytest.skip("PostgreSQL's SQLSTATE")
    from sqlalchemy import text

    from callplane_server.store import Store

    async with fresh_database(backend, tmp_path) as url:
        store = await Store.open(url)
        try:

            async def write(session):
                await session.execute(
                    text(
                        "DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device' "
                        "USING ERRCODE = 'disk_full'; END $$"
                    )
                )

            with pytest.raises(errors.Unavailable) as caught:
                await store.database.run(write, write=True)
            assert caught.value.reason == "STORAGE_FULL"
            assert "no space left on device" in caught.value.message
        finally:
            await store.close()


class _Proxy:
    """A TCP proxy in front of PostgreSQL that can be cut: open connections drop, new ones are refused."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


async def test_database_unreachable_is_unavailable(backend, tmp_path):
    if backend != "postgres":
        pytest.skip("needs a database server to take away")
    from sqlalchemy.engine import make_url

    from callplane_server.app import CallplaneServer
    from callplane_server.config import Config

    async with fresh_database(backend, tmp_path) as url:
        parsed = make_url(url)
        proxy = _Proxy(parsed.host or "127.0.0.1", parsed.port or 5432)
        await proxy.start()
        proxied = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        server = CallplaneServer(
            Config(api_secret=TEST_SECRET, listen="127.0.0.1:0", database_url=proxied, data_dir=tmp_path)
        )
        await server.start()
        try:
            async with authed_channel(f"127.0.0.1:{server.port}") as channel:
                stub = call_type_service_pb2_grpc.CallTypeServiceStub(channel)
                await stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest())
                await proxy.cut()
                details = await expect_error(
                    stub.ListCallTypes(call_type_service_pb2.ListCallTypesRequest(), timeout=30),
                    grpc.StatusCode.UNAVAILABLE,
                    "DATABASE_UNAVAILABLE",
                )
                assert "retry" in details.message
        finally:
            await server.stop(grace=0)
