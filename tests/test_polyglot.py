"""Polyglot end-to-end tests: the real `callplane serve` process, driven by other languages and tools.

- the Node.js client's own test suite (clients/node/test/) against the server;
- `buf curl` through server reflection (grpc.reflection.v1alpha, the only one Python serves).

Each runs once on a fresh SQLite data dir and, when CALLPLANE_TEST_POSTGRES_URL is set (e.g.
postgresql://postgres@127.0.0.1:5432/postgres), once on a fresh PostgreSQL database created for the
module and dropped afterwards. Missing tools (node, clients/node/node_modules) skip the tests locally and
fail them when CI=true.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import callplane_command, fresh_database, unavailable
from tests.support import channel as authed_channel

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
NODE_TESTS = sorted((NODE_DIR / "test").glob("*.test.js"))
BUF = NODE_DIR / "node_modules" / ".bin" / "buf"
SERVICES = ("callplane.v1.CallTypeService", "callplane.v1.UserService", "callplane.v1.CallService")
STARTUP_TIMEOUT_S = 60
TOOL_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server_env() -> dict[str, str]:
    """The caller's environment minus CALLPLANE_* settings, so only the command line configures the server."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("CALLPLANE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class ServerProcess:
    """A `callplane serve` subprocess."""

    backend: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path
    # A server token from `callplane token --server` for the development secret in the data folder.
    token: str = ""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


async def _wait_serving(server: ServerProcess) -> None:
    last_error: Exception | None = None
    async with authed_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(STARTUP_TIMEOUT_S * 5):
            if server.process.returncode is not None:
                pytest.fail(f"server exited with {server.process.returncode} during startup:\n{server.log()}")
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                last_error = error
            await asyncio.sleep(0.2)
    pytest.fail(f"server not SERVING after {STARTUP_TIMEOUT_S}s ({last_error!r}):\n{server.log()}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served(backend: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ServerProcess]:
    """`callplane serve` as a subprocess: SQLite in a fresh --data-dir, or a fresh PostgreSQL database
    (--database-url) created and dropped by tests.support.fresh_database."""
    data_dir = tmp_path_factory.mktemp(f"polyglot-{backend}")
    command = [callplane_command(), "serve", "--data-dir", str(data_dir)]
    async with contextlib.AsyncExitStack() as stack:
        if backend == "postgres":
            database_url = await stack.enter_async_context(fresh_database(backend, data_dir))
            command += ["--database-url", database_url]
        port = _free_port()
        command += ["--listen", f"127.0.0.1:{port}"]
        log_path = data_dir / "server.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=log_file, stderr=subprocess.STDOUT, env=_server_env()
            )
        server = ServerProcess(backend, port, process, log_path)
        try:
            await _wait_serving(server)
            minter = await asyncio.create_subprocess_exec(
                callplane_command(),
                "token",
                "--server",
                "--data-dir",
                str(data_dir),
                env=_server_env(),
                stdout=asyncio.subprocess.PIPE,
            )
            minted, _ = await asyncio.wait_for(minter.communicate(), TOOL_TIMEOUT_S)
            assert minter.returncode == 0, "callplane token --server failed"
            server.token = minted.decode().strip()
            yield server
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout=15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


# ---------------------------------------------------------------------------------------------------
# Node.js client


def test_node_client_suite(served: ServerProcess) -> None:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not on PATH")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        unavailable("clients/node/node_modules is missing: run `make node`")
    assert NODE_TESTS, "no clients/node/test/*.test.js"
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", *map(str, NODE_TESTS)],
        cwd=NODE_DIR,
        env={**os.environ, "CALLPLANE_TARGET": served.target, "CALLPLANE_TOKEN": served.token},
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, (
        f"node --test failed ({served.backend}):\n{output}\nserver log:\n{served.log()}"
    )
    assert "# SKIP" not in result.stdout, f"the server suite was skipped:\n{output}"
    assert "# fail 0" in result.stdout, output


# ---------------------------------------------------------------------------------------------------
# buf curl through server reflection


def _buf(*args: str, data: object | None = None) -> subprocess.CompletedProcess[str]:
    if not BUF.exists():
        unavailable("clients/node/node_modules/.bin/buf is missing: run `make node`")
    command = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=ROOT)


def _auth(served: ServerProcess) -> tuple[str, str]:
    return ("-H", f"authorization: Bearer {served.token}")


def _buf_ok(served: ServerProcess, method: str, data: object) -> dict[str, object]:
    result = _buf(*_auth(served), f"{served.url}/{method}", data=data)
    assert result.returncode == 0, f"buf curl {method} failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


def test_buf_curl_lists_services_and_methods(served: ServerProcess) -> None:
    services = _buf("--list-services", served.url)
    assert services.returncode == 0, services.stderr
    listed = set(services.stdout.split())
    assert set(SERVICES) <= listed, services.stdout
    assert "grpc.health.v1.Health" in listed, services.stdout

    methods = _buf("--list-methods", served.url)
    assert methods.returncode == 0, methods.stderr
    listed = set(methods.stdout.split())
    for method in (
        "callplane.v1.CallService/GetOrCreateCall",
        "callplane.v1.CallService/QueryCalls",
        "callplane.v1.UserService/UpsertUsers",
        "callplane.v1.CallTypeService/ListCallTypes",
    ):
        assert method in listed, methods.stdout


def test_buf_curl_calls(served: ServerProcess) -> None:
    run = uuid.uuid4().hex[:10]
    user = f"buf-{run}"
    call_id = f"buf-{run}"

    upserted = _buf_ok(
        served, "callplane.v1.UserService/UpsertUsers", {"users": [{"id": user, "name": "Buf"}]}
    )
    assert [u["id"] for u in upserted["users"]] == [user]

    created = _buf_ok(
        served,
        "callplane.v1.CallService/GetOrCreateCall",
        {
            "type": "default",
            "id": call_id,
            "data": {
                "created_by_id": user,
                "members": [{"user_id": user, "role": "host"}],
                "custom": {"color": "red", "run": run, "score": 3},
            },
        },
    )
    assert created["created"] is True
    call = created["call"]
    assert call["cid"] == f"default:{call_id}"
    assert call["custom"] == {"color": "red", "run": run, "score": 3}
    assert call["memberCount"] == 1
    assert [m["userId"] for m in created["members"]] == [user]

    queried = _buf_ok(
        served,
        "callplane.v1.CallService/QueryCalls",
        {"filter_conditions": {"custom.run": run, "custom.score": {"$gte": 3}}, "limit": 5},
    )
    assert [c["call"]["cid"] for c in queried["calls"]] == [f"default:{call_id}"]


def test_buf_curl_error_carries_status_details(served: ServerProcess) -> None:
    run = uuid.uuid4().hex[:10]
    ghost = f"ghost-{run}"
    result = _buf(
        *_auth(served),
        f"{served.url}/callplane.v1.CallService/GetOrCreateCall",
        data={"type": "default", "id": f"bad-{run}", "data": {"members": [{"user_id": ghost}]}},
    )
    # buf curl exits with the gRPC code shifted left by 3: INVALID_ARGUMENT (3) -> 24.
    assert result.returncode == grpc.StatusCode.INVALID_ARGUMENT.value[0] << 3, (
        result.returncode,
        result.stderr,
    )
    error = json.loads(result.stderr)
    assert error["code"] == "invalid_argument", error
    assert ghost in json.dumps(error), error
    # Details are printed as {type, value: unpadded base64 of the packed message}.
    details = {detail["type"]: detail["value"] for detail in error.get("details", [])}
    assert "google.rpc.ErrorInfo" in details, error
    encoded = details["google.rpc.ErrorInfo"]
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(encoded + "=" * (-len(encoded) % 4)))
    assert info.domain == "callplane", info
    assert re.fullmatch(r"[A-Z][A-Z0-9_]*", info.reason), info


def test_buf_curl_without_a_token_is_unauthenticated(served: ServerProcess) -> None:
    result = _buf(f"{served.url}/callplane.v1.CallService/QueryCalls", data={})
    assert result.returncode == grpc.StatusCode.UNAUTHENTICATED.value[0] << 3, (
        result.returncode,
        result.stderr,
    )
    error = json.loads(result.stderr)
    assert error["code"] == "unauthenticated", error
    details = {detail["type"]: detail["value"] for detail in error.get("details", [])}
    encoded = details["google.rpc.ErrorInfo"]
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(encoded + "=" * (-len(encoded) % 4)))
    assert info.reason == "TOKEN_MISSING", info
