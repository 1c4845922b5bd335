"""`callplane serve --log-format json`: every line of the log is one JSON object; the line of an RPC
carries its method, code, duration, cid, caller and, when tracing is on, the trace id it belongs to."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from callplane.v1 import call_service_pb2, call_service_pb2_grpc
from tests.support import (
    BACKENDS,
    channel,
    fresh_database,
    serve_subprocess,
    serving_port,
    user_token,
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


async def _serve_and_call(tmp_path: Path, backend: str) -> list[dict[str, Any]]:
    """Runs a JSON-logging server, makes a few RPCs (one in the trace TRACE_ID, one refused for a user),
    stops it and returns its log, every line parsed."""
    async with fresh_database(backend, tmp_path) as url:
        process = await serve_subprocess(
            tmp_path, "--database-url", url, "--log-format", "json", "--log-requests", "--shutdown-grace", "1"
        )
        try:
            port, early = await serving_port(process)
            target = f"127.0.0.1:{port}"
            async with channel(target) as authed:
                calls = call_service_pb2_grpc.CallServiceStub(authed)
                await calls.GetOrCreateCall(
                    call_service_pb2.GetOrCreateCallRequest(type="default", id="logged"),
                    metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")],
                )
            async with channel(target, token=user_token("logger")) as as_user:
                with pytest.raises(grpc.aio.AioRpcError):
                    await call_service_pb2_grpc.CallServiceStub(as_user).GetCall(
                        call_service_pb2.GetCallRequest(type="default", id="absent")
                    )
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            assert process.stderr is not None
            rest = await asyncio.wait_for(process.stderr.read(), timeout=60)
            await asyncio.wait_for(process.wait(), timeout=60)
    text = "".join(early) + rest.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _rpc(records: list[dict[str, Any]], method: str) -> dict[str, Any]:
    [record] = [r for r in records if r.get("method") == method]
    return record


@pytest.mark.parametrize("backend", BACKENDS)
async def test_json_lines_parse_and_carry_the_trace_id(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tracing on (spans printed to the server's stdout): the RPC line names the trace it was served in.
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    records = await _serve_and_call(tmp_path, backend)
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    created = _rpc(records, "/callplane.v1.CallService/GetOrCreateCall")
    assert created["code"] == "OK"
    assert created["cid"] == "default:logged"
    assert created["user"] == "server"
    assert created["level"] == "INFO"
    assert isinstance(created["duration_ms"], float) and created["duration_ms"] >= 0
    assert created["trace_id"] == TRACE_ID
    refused = _rpc(records, "/callplane.v1.CallService/GetCall")
    assert refused["code"] in ("NOT_FOUND", "PERMISSION_DENIED")
    assert refused["user"] == "logger"
    assert refused["cid"] == "default:absent"
    assert len(refused["trace_id"]) == 32 and refused["trace_id"] != TRACE_ID  # a trace of its own


@pytest.mark.parametrize("backend", BACKENDS)
async def test_json_lines_without_tracing_have_no_trace_id(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    records = await _serve_and_call(tmp_path, backend)
    created = _rpc(records, "/callplane.v1.CallService/GetOrCreateCall")
    assert created["code"] == "OK" and created["cid"] == "default:logged"
    assert "trace_id" not in created
