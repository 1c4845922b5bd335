"""The webhook benchmark's own logic (tests/bench/webhooks.py): what it checks before it reports a figure,
and how its results are merged and rendered. The scenario itself runs with `make bench --only webhooks`."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from tests.bench import report, webhooks
from tests.bench.fanout import BenchError

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def _receipt(position: int, call: int, seq: int, mono: float, message_id: str | None = None) -> list[Any]:
    """A verified receipt as the receiver's `take` returns it."""
    cid = f"default:{webhooks.call_id(call)}"
    return [
        message_id or f"evt_{position}",
        mono,
        1000.0 + mono,
        position,
        cid,
        seq,
        1000.0 + mono - 0.002,
        "custom",
    ]


def _taken(records: list[list[Any]], bad: int = 0) -> dict[str, Any]:
    return {"records": records, "verified": len(records), "bad_signatures": bad, "bad": ["x"] * bad}


# OK replies: [call index, seq, sent, acknowledged] (monotonic).
ACKED = [[0, 1, 0.0, 0.010], [1, 1, 0.0, 0.012], [0, 2, 0.005, 0.020]]


def test_analyse_counts_each_event_once_and_times_it_from_its_ack() -> None:
    receipts = [
        _receipt(11, 0, 1, 0.015),
        _receipt(12, 1, 1, 0.011),  # before its ack: clamped at 0 and counted
        _receipt(11, 0, 1, 0.030),  # a repeat with the same webhook-id
        _receipt(13, 0, 2, 0.040),
    ]
    figures = webhooks._analyse("sqlite", "full", ACKED, _taken(receipts), 10, 13, drained=True)
    assert figures["events_received"] == 3 and figures["repeated_receipts"] == 1
    assert figures["received_before_ack"] == 1
    assert figures["ack_to_delivery_ms"]["p50"] == pytest.approx(5.0)
    assert figures["ack_to_delivery_ms"]["max"] == pytest.approx(20.0)
    assert figures["created_to_delivery_ms"]["p99"] == pytest.approx(2.0)
    # Received from the first ack (0.010) to the last receipt (0.040).
    assert figures["delivered_per_second"] == pytest.approx(3 / 0.030, rel=1e-3)
    assert figures["backlog_at_writes_end"] == 1 and figures["drain_seconds"] == pytest.approx(0.020)


@pytest.mark.parametrize(
    ("receipts", "bad", "message"),
    [
        ([_receipt(11, 0, 1, 0.02), _receipt(12, 1, 1, 0.02)], 0, "1 of 3 acknowledged events never reached"),
        (
            [_receipt(11, 0, 1, 0.02), _receipt(12, 1, 1, 0.02), _receipt(13, 0, 2, 0.03, "evt_99")],
            0,
            "webhook-id evt_99",
        ),
        (
            [_receipt(13, 0, 2, 0.02), _receipt(12, 1, 1, 0.02), _receipt(11, 0, 1, 0.03)],
            0,
            "received before an earlier event of their call",
        ),
        ([_receipt(9, 0, 1, 0.02)], 0, "not an event this phase acknowledged"),
        (
            [_receipt(11, 0, 1, 0.02), _receipt(12, 1, 1, 0.02), _receipt(13, 0, 2, 0.03)],
            1,
            "failed verification",
        ),
    ],
)
def test_a_phase_that_did_not_deliver_exactly_what_was_written_stops_the_bench(
    receipts: list[list[Any]], bad: int, message: str
) -> None:
    with pytest.raises(BenchError, match=message):
        webhooks._analyse("sqlite", "full", ACKED, _taken(receipts, bad), 10, 13, drained=True)


def test_receiver_verifies_every_signature_and_reads_the_event_fields() -> None:
    signer = Webhook(SECRET)
    now = datetime.now(UTC)
    stamp = str(int(now.timestamp()))
    body = json.dumps(
        {
            "callCid": "default:wh-000",
            "seq": "7",
            "position": "42",
            "createdAt": "2026-11-30T16:00:00.123456Z",
            "type": "custom",
        }
    ).encode()
    good = (1.0, 2.0, "evt_42", stamp, signer.sign("evt_42", now, body.decode()), body)
    tampered = (1.5, 2.5, "evt_42", stamp, signer.sign("evt_42", now, body.decode()), body + b" ")
    result = webhooks._verified([good, tampered], SECRET)
    assert result["verified"] == 1 and result["bad_signatures"] == 1
    (record,) = result["records"]
    assert record[:6] == ["evt_42", 1.0, 2.0, 42, "default:wh-000", 7]
    assert record[6] == pytest.approx(datetime(2026, 11, 30, 16, 0, 0, 123456, tzinfo=UTC).timestamp())


def _phase(received: int) -> dict[str, Any]:
    spread = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "max": 4.0}
    return {
        "writes_per_second": 100.0,
        "delivered_per_second": 90.0,
        "events_received": received,
        "repeated_receipts": 0,
        "signatures_verified": received,
        "out_of_order": 0,
        "checks": {"events_appended": received},
        "ack_to_delivery_ms": spread,
        "created_to_delivery_ms": spread,
        "backlog_at_writes_end": 5,
        "drain_seconds": 0.5,
        "drained_per_second": 10.0,
        "server_cpu_percent": 80.0,
        "generator_cpu_percent": 10.0,
        "receiver_cpu_percent": 3.0,
    }


def _measured() -> dict[str, Any]:
    return {
        "no_endpoint": {"writes_per_second": 800.0, "server_cpu_percent": 95.0},
        "paced": [_phase(150), _phase(600)],
        "full": _phase(1000),
        "replay": {"delivered_per_second": 1100.0, "events_received": 1000, "server_cpu_percent": 70.0},
        "load_average": [0.5, 1.5],
    }


def test_report_renders_every_phase_per_backend() -> None:
    settings = webhooks.settings_record(webhooks.WebhookSettings())
    hooks = {"date": "2026-11-30", "settings": settings, "pinned": True, "backends": {"sqlite": _measured()}}
    text = "\n".join(report.webhooks_markdown(hooks, "a machine"))
    assert "| webhooks | SQLite |" in text
    assert "paced 50/s" in text and "paced 200/s" in text
    assert "1,750 = 1,750; 0; 1,750; 0" in text
    assert "**1,100** (1,000 events)" in text
    assert "| 0.5 / 1.5 |" in text


def test_merge_keeps_the_webhooks_a_run_did_not_measure() -> None:
    previous = {
        "date": "2026-01-01",
        "machine": {},
        "backends": {"sqlite": {"rpcs": {}}},
        "webhooks": {"backends": {"sqlite": {"full": 1}, "postgres": {"full": 2}}},
    }
    only_rpcs = {"date": "2026-02-02", "machine": {}, "backends": {"sqlite": {"rpcs": {"x": 1}}}}
    assert report.merge(only_rpcs, previous, ["rpcs"])["webhooks"] == previous["webhooks"]
    only_sqlite = {**only_rpcs, "webhooks": {"date": "2026-02-02", "backends": {"sqlite": {"full": 3}}}}
    merged = report.merge(only_sqlite, previous, ["webhooks"])
    assert merged["backends"] == previous["backends"]
    assert merged["webhooks"]["backends"] == {"sqlite": {"full": 3}, "postgres": {"full": 2}}
