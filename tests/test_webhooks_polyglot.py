"""Webhook signatures checked by another language's Standard Webhooks library: the npm `standardwebhooks`
package, through `clients/node/verify-webhook.js`, accepts what the server sends.

A real server (both backends) delivers to a local aiohttp receiver; the captured headers and exact body
go to the script in files. The script's receiver mode (`--listen`) is also used as the endpoint itself.
Node and clients/node/node_modules are required in CI and skip the tests elsewhere (as in
test_polyglot.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest_asyncio

from callplane import CallplaneClient
from tests.support import SERVER_TOKEN, RunningServer, unavailable
from tests.webhook_receiver import DELIVERY_TIMEOUT_S, Delivery, Receiver

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "clients" / "node"
SCRIPT = NODE_DIR / "verify-webhook.js"


def node_command() -> str:
    """`node`, with the npm `standardwebhooks` package installed; skipped locally, required in CI."""
    node = shutil.which("node")
    reason = ""
    if node is None:
        reason = "node is not on PATH"
    elif not (NODE_DIR / "node_modules" / "standardwebhooks").is_dir():
        reason = "clients/node/node_modules/standardwebhooks is missing: run `make node`"
    if reason:
        unavailable(reason)
    assert node is not None
    return node


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(delivering_server: RunningServer) -> AsyncIterator[CallplaneClient]:
    async with CallplaneClient(delivering_server.target, token=SERVER_TOKEN) as c:
        await c.upsert_users([{"id": "alice"}])
        yield c


async def node_verify(secret: str, headers: dict[str, str], body: bytes, folder: Path) -> tuple[int, Any]:
    """Runs the script on one captured request: its exit code and the JSON it printed."""
    headers_file, body_file = folder / f"headers-{uuid.uuid4().hex}.json", folder / f"body-{uuid.uuid4().hex}"
    headers_file.write_text(json.dumps(headers))
    body_file.write_bytes(body)
    process = await asyncio.create_subprocess_exec(
        node_command(),
        str(SCRIPT),
        "--secret",
        secret,
        "--headers-file",
        str(headers_file),
        "--body-file",
        str(body_file),
        cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), DELIVERY_TIMEOUT_S)
    assert process.returncode is not None
    assert process.returncode in (0, 1), err.decode()
    return process.returncode, json.loads(out)


async def capture(client: CallplaneClient, receiver: Receiver) -> tuple[str, Delivery]:
    """A new call, and the request delivering its call.created event."""
    call = client.call("default", f"poly-{uuid.uuid4().hex[:10]}")
    await call.get_or_create(created_by_id="alice")
    delivery = await receiver.next_where(lambda d: d.event()["callCid"] == call.cid)
    return call.cid, delivery


async def test_node_library_accepts_our_signature(client: CallplaneClient, tmp_path: Path) -> None:
    node_command()
    async with Receiver() as receiver:
        created = await client.create_webhook(receiver.url, event_types=["call.created"])
        cid, delivery = await capture(client, receiver)
        code, result = await node_verify(created.secret, delivery.headers, delivery.body, tmp_path)
        assert code == 0, result
        assert result == {
            "verified": True,
            "webhookId": delivery.id,
            "type": "call.created",
            "callCid": cid,
            "seq": delivery.event()["seq"],
        }

        # Refused: a body changed by one byte, another secret, a signature from another message.
        code, result = await node_verify(created.secret, delivery.headers, delivery.body + b" ", tmp_path)
        assert (code, result["verified"]) == (1, False)
        other = await client.create_webhook("http://127.0.0.1:9/unused")
        code, result = await node_verify(other.secret, delivery.headers, delivery.body, tmp_path)
        assert (code, result["verified"]) == (1, False)
        forged = {**delivery.headers, "webhook-id": delivery.id + "0"}
        code, result = await node_verify(created.secret, forged, delivery.body, tmp_path)
        assert (code, result["verified"]) == (1, False)

        # While a rotated secret overlaps, the request carries two signatures: either secret verifies.
        rotated = await client.rotate_webhook_secret(created.webhook.id, overlap=timedelta(hours=1))
        for _ in range(200):  # the worker takes the new secret at its next lease round
            _, delivery = await capture(client, receiver)
            if len(delivery.signatures) == 2:
                break
        else:
            raise AssertionError("no delivery was signed with the rotated secret")
        for secret in (created.secret, rotated.secret):
            code, result = await node_verify(secret, delivery.headers, delivery.body, tmp_path)
            assert (code, result["verified"]) == (0, True)
        for webhook in (created.webhook.id, other.webhook.id):
            await client.delete_webhook(webhook)


async def test_node_receiver_as_the_endpoint(client: CallplaneClient) -> None:
    """The script's `--listen` mode is the receiver the README shows: it verifies every POST."""
    node = node_command()
    created = await client.create_webhook("http://127.0.0.1:9/placeholder", event_types=["call.created"])
    process = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        "--listen",
        "0",
        cwd=NODE_DIR,
        env={**os.environ, "WEBHOOK_SECRET": created.secret},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None and process.stdout is not None
        banner = (await asyncio.wait_for(process.stderr.readline(), DELIVERY_TIMEOUT_S)).decode()
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", banner)
        assert found, banner
        await client.update_webhook(created.webhook.id, url=f"http://127.0.0.1:{found.group(1)}/webhooks")
        call = client.call("default", f"poly-{uuid.uuid4().hex[:10]}")
        await call.get_or_create(created_by_id="alice")
        while True:
            line = json.loads(await asyncio.wait_for(process.stdout.readline(), DELIVERY_TIMEOUT_S))
            if line.get("callCid") == call.cid:
                break
        assert line["verified"] is True and line["type"] == "call.created"
        assert line["webhookId"].startswith("evt_")
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()
        await client.delete_webhook(created.webhook.id)
