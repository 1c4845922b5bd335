"""`callplane webhook verify`: run as a subprocess on requests a real server (both backends) delivered to
a local aiohttp receiver."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from callplane import CallplaneClient
from callplane_server.webhooks.verification import parse_headers, verify_request
from tests.support import SERVER_TOKEN, RunningServer, callplane_command
from tests.webhook_receiver import DELIVERY_TIMEOUT_S, Delivery, Receiver

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" + "="  # 24 bytes, fixed: the unit tests sign with it


# --------------------------------------------------------------------------------------------------
# No server
# --------------------------------------------------------------------------------------------------


def test_headers_from_json_or_lines() -> None:
    assert parse_headers('{"Webhook-Id": "evt_1", "webhook-timestamp": 5}') == {
        "webhook-id": "evt_1",
        "webhook-timestamp": "5",
    }
    raw = "POST /hook HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nWebhook-Signature: v1,abc= v1,def=\r\n\r\n"
    assert parse_headers(raw) == {"host": "127.0.0.1:8080", "webhook-signature": "v1,abc= v1,def="}
    with pytest.raises(ValueError):
        parse_headers('{"webhook-id": ')


def test_report_names_the_matching_signature_and_an_old_timestamp() -> None:
    body = '{"type":"custom","callCid":"default:a","seq":"2","position":"7"}'
    old = datetime.now(UTC) - timedelta(hours=1)
    other = "whsec_" + "A" * 43 + "="
    signatures = [Webhook(secret).sign("evt_7", old, body) for secret in (other, SECRET)]
    headers = {
        "webhook-id": "evt_7",
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
    result = verify_request(SECRET, headers, body.encode())
    assert not result.verified and "too old" in result.error
    assert (result.signatures, result.matching) == (2, [2])  # the signature itself was right
    report = result.report(datetime.now(UTC))
    assert "this secret made #2" in report and "custom default:a seq 2 position 7" in report
    assert "verified:          NO: Message timestamp too old" in report
    with pytest.raises(ValueError, match="not a webhook secret"):
        verify_request("whsec_", headers, body.encode())


# --------------------------------------------------------------------------------------------------
# A real delivery
# --------------------------------------------------------------------------------------------------


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        callplane_command(),
        "webhook",
        "verify",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), DELIVERY_TIMEOUT_S * 3)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def save(delivery: Delivery, folder: Path, *, as_lines: bool = False) -> tuple[str, str]:
    headers, body = folder / f"headers-{uuid.uuid4().hex}", folder / f"body-{uuid.uuid4().hex}"
    if as_lines:
        text = "POST /hook HTTP/1.1\n" + "".join(f"{k}: {v}\n" for k, v in delivery.headers.items())
        headers.write_text(text)
    else:
        headers.write_text(json.dumps(delivery.headers))
    body.write_bytes(delivery.body)
    return str(headers), str(body)


async def test_verify_a_real_delivery(delivering_server: RunningServer, tmp_path: Path) -> None:
    async with (
        CallplaneClient(delivering_server.target, token=SERVER_TOKEN) as client,
        Receiver() as receiver,
    ):
        await client.upsert_users([{"id": "alice"}])
        created = await client.create_webhook(receiver.url, event_types=["call.created"])
        call = client.call("default", f"cli-{uuid.uuid4().hex[:10]}")
        await call.get_or_create(created_by_id="alice")
        delivery = await receiver.next_where(lambda d: d.event()["callCid"] == call.cid)
        event = delivery.event()

        headers, body = save(delivery, tmp_path)
        code, out, err = await run_cli(
            "--secret", created.secret, "--headers-file", headers, "--body-file", body
        )
        assert code == 0, out + err
        assert f"webhook-id:        {delivery.id}" in out
        assert f"call.created {call.cid} seq {event['seq']} position {event['position']}" in out
        assert "signatures:        1; this secret made #1" in out
        assert out.rstrip().endswith("verified:          yes")

        # The secret from the environment, headers as `Name: value` lines (after the request line).
        lines, _ = save(delivery, tmp_path, as_lines=True)
        code, out, _ = await run_cli(
            "--headers-file", lines, "--body-file", body, env={"WEBHOOK_SECRET": created.secret}
        )
        assert code == 0 and out.rstrip().endswith("verified:          yes"), out
        # Another endpoint's secret does not verify (exit 1).
        other = await client.create_webhook("http://127.0.0.1:9/unused")
        code, out, _ = await run_cli("--secret", other.secret, "--headers-file", headers, "--body-file", body)
        assert code == 1
        assert "none made with this secret" in out and "NO: No matching signature found" in out

        # A tampered body.
        tampered = tmp_path / "tampered"
        tampered.write_bytes(delivery.body.replace(b"call.created", b"call.deleted"))
        code, out, _ = await run_cli(
            "--secret", created.secret, "--headers-file", headers, "--body-file", str(tampered)
        )
        assert code == 1 and "NO: No matching signature found" in out

        # Not a verdict: a missing file or a malformed secret exits 2 with the reason.
        code, _, err = await run_cli(
            "--secret", created.secret, "--headers-file", str(tmp_path / "none"), "--body-file", body
        )
        assert code == 2 and "none" in err
        code, _, err = await run_cli("--secret", "whsec_", "--headers-file", headers, "--body-file", body)
        assert code == 2 and "not a webhook secret" in err
        for webhook_id in (created.webhook.id, other.webhook.id):
            await client.delete_webhook(webhook_id)
