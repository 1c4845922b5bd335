"""Server configuration from flags and CALLPLANE_* environment variables (flags win)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from callplane_server.services.limits import Limits
from callplane_server.store.custom_indexes import CustomIndex, parse_custom_index


@dataclass(frozen=True)
class Config:
    listen: str = "127.0.0.1:50051"
    data_dir: Path = Path("data")
    # Empty: an embedded SQLite database in data_dir.
    database_url: str = ""
    reflection: bool = True
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    # "text" (one readable line per record) or "json" (one JSON object per line).
    log_format: str = "text"
    # Log every successful unary RPC at INFO (default: at DEBUG; failures, refusals and streams always INFO).
    log_requests: bool = False
    limits: Limits = field(default_factory=Limits)
    # The shortest progress_interval a watch stream may ask for (shorter requests are raised to it). Streams
    # that ask for none get no periodic progress: an idle stream costs nothing.
    min_progress_interval_seconds: float = 1.0
    # Events older than this are compacted away; resuming before them is EVENTS_COMPACTED.
    event_retention_seconds: float = 86_400.0
    # Per-subscriber queue bound; a subscriber that falls further behind reads from the log instead.
    event_queue_size: int = 256
    # How often the tailer looks for events committed by other processes (local commits ring at once).
    event_poll_interval_seconds: float = 0.25
    # How often due timers (inactivity, max duration, ring timeouts, leases) are looked for.
    timer_poll_interval_seconds: float = 0.5
    # Tests turn the background timer loop off and fire timers with run_due() and an injected clock.
    run_timers: bool = True
    # A participant not renewed (KeepAlive or a presence-holding WatchCall) for this long is removed.
    lease_ttl_seconds: float = 30.0
    # HS256 secret for bearer tokens. Empty: CALLPLANE_API_SECRET, else a development secret generated
    # once and kept in data_dir/api_secret (replicas sharing a database must share the secret).
    api_secret: str = ""
    # host:port for Prometheus metrics over HTTP (/metrics); empty: not served.
    metrics_listen: str = ""
    # Compound indexes on call custom data for QueryCalls (see store/custom_indexes.py).
    custom_indexes: tuple[CustomIndex, ...] = ()
    # Refuse QueryCalls requests on custom data that no READY index serves (FAILED_PRECONDITION
    # INDEX_REQUIRED) instead of only logging them.
    require_indexes: bool = False
    # Webhooks (see webhook_service.proto): deliver to loopback/private/link-local targets too.
    webhook_allow_private: bool = False
    # An event not delivered within this long of its first attempt makes its endpoint FAILING.
    webhook_retry_period_seconds: float = 86_400.0
    # Each delivery attempt gives up after this long.
    webhook_timeout_seconds: float = 10.0
    # Attempts in flight per endpoint (events of different calls).
    webhook_concurrency: int = 16
    # A replica's hold on the endpoints it delivers (PostgreSQL: another takes over this long after it died).
    webhook_lease_seconds: float = 15.0
    # Tests turn delivery off where they only manage endpoints.
    run_webhooks: bool = True

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'callplane.db').resolve()}"


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


def _secret(secret_file: str | None, env: Mapping[str, str]) -> str:
    if secret_file:
        return Path(secret_file).read_text().strip()
    return env.get("CALLPLANE_API_SECRET", "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="host:port to serve on (CALLPLANE_LISTEN; default 127.0.0.1:50051)")
    parser.add_argument(
        "--data-dir", help="folder for the embedded SQLite database (CALLPLANE_DATA_DIR; default data)"
    )
    parser.add_argument(
        "--database-url",
        help="sqlite:///path or postgresql://user@host/db (CALLPLANE_DATABASE_URL; default: data dir)",
    )
    parser.add_argument(
        "--no-reflection", action="store_true", help="disable gRPC reflection (CALLPLANE_REFLECTION=0)"
    )
    parser.add_argument(
        "--metrics-listen",
        help="host:port serving Prometheus /metrics (CALLPLANE_METRICS_LISTEN; default off)",
    )
    parser.add_argument(
        "--custom-index",
        action="append",
        metavar="SPEC",
        help="index call custom data for QueryCalls, e.g. region:string,priority:number:desc "
        "(repeatable; CALLPLANE_CUSTOM_INDEXES, specs separated by ';')",
    )
    parser.add_argument(
        "--require-indexes",
        action="store_true",
        default=None,
        help="refuse QueryCalls filters and sorts on custom data that no declared, READY index serves, "
        "with FAILED_PRECONDITION INDEX_REQUIRED naming the index to declare (CALLPLANE_REQUIRE_INDEXES=1; "
        "by default such queries run, reading every call, and are logged once per shape)",
    )
    parser.add_argument(
        "--webhook-allow-private",
        action="store_true",
        default=None,
        help="let webhooks target loopback, private and link-local addresses "
        "(CALLPLANE_WEBHOOK_ALLOW_PRIVATE=1; by default such URLs are refused when created and at every "
        "connection: SSRF)",
    )
    parser.add_argument(
        "--webhook-retry-period",
        type=float,
        help="seconds an event is retried before its endpoint is marked FAILING "
        "(CALLPLANE_WEBHOOK_RETRY_PERIOD_SECONDS; default 86400)",
    )
    parser.add_argument(
        "--webhook-timeout",
        type=float,
        help="seconds one delivery attempt may take (CALLPLANE_WEBHOOK_TIMEOUT_SECONDS; default 10)",
    )
    parser.add_argument(
        "--webhook-concurrency",
        type=int,
        help="attempts in flight per endpoint, for events of different calls "
        "(CALLPLANE_WEBHOOK_CONCURRENCY; default 16)",
    )
    parser.add_argument("--shutdown-grace", type=float, help="seconds to drain on SIGTERM (default 10)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING (CALLPLANE_LOG_LEVEL; default INFO)")
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="text lines, or one JSON object per line with time, level, message and, for each RPC, method, "
        "code, duration_ms, cid, user and trace_id (CALLPLANE_LOG_FORMAT; default text)",
    )
    parser.add_argument(
        "--log-requests",
        action="store_true",
        default=None,
        help="log every successful unary RPC at INFO too (CALLPLANE_LOG_REQUESTS=1; by default they are "
        "logged at DEBUG, and refusals, errors and streams at INFO)",
    )
    parser.add_argument(
        "--min-progress-interval",
        type=float,
        help="the shortest progress_interval a watch stream may ask for, in seconds; shorter requests are "
        "raised to it (CALLPLANE_MIN_PROGRESS_INTERVAL_SECONDS; default 1)",
    )
    parser.add_argument("--event-retention", type=float, help="seconds events are kept (default 86400)")
    for name, default in (
        ("max-call-custom-bytes", Limits.max_call_custom_bytes),
        ("max-member-custom-bytes", Limits.max_member_custom_bytes),
        ("max-user-custom-bytes", Limits.max_user_custom_bytes),
    ):
        parser.add_argument(
            f"--{name}", type=int, help=f"(CALLPLANE_{name.upper().replace('-', '_')}; default {default})"
        )


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ

    def pick(flag: str, variable: str) -> str | None:
        value = getattr(args, flag, None) if args is not None else None
        if value is not None:
            return str(value)
        return env.get(variable)

    defaults = Config()
    limits = Limits(
        **{
            name: int(pick(name, f"CALLPLANE_{name.upper()}") or getattr(defaults.limits, name))
            for name in ("max_call_custom_bytes", "max_member_custom_bytes", "max_user_custom_bytes")
        }
    )
    reflection = defaults.reflection
    if env.get("CALLPLANE_REFLECTION") is not None:
        reflection = _bool(env["CALLPLANE_REFLECTION"])
    if args is not None and getattr(args, "no_reflection", False):
        reflection = False
    return Config(
        listen=pick("listen", "CALLPLANE_LISTEN") or defaults.listen,
        data_dir=Path(pick("data_dir", "CALLPLANE_DATA_DIR") or defaults.data_dir),
        database_url=pick("database_url", "CALLPLANE_DATABASE_URL") or "",
        reflection=reflection,
        shutdown_grace_seconds=float(pick("shutdown_grace", "CALLPLANE_SHUTDOWN_GRACE_SECONDS") or 10.0),
        log_level=(pick("log_level", "CALLPLANE_LOG_LEVEL") or defaults.log_level).upper(),
        log_requests=_bool(pick("log_requests", "CALLPLANE_LOG_REQUESTS") or "false"),
        log_format=_log_format(pick("log_format", "CALLPLANE_LOG_FORMAT") or defaults.log_format),
        limits=limits,
        min_progress_interval_seconds=float(
            pick("min_progress_interval", "CALLPLANE_MIN_PROGRESS_INTERVAL_SECONDS")
            or defaults.min_progress_interval_seconds
        ),
        event_retention_seconds=float(
            pick("event_retention", "CALLPLANE_EVENT_RETENTION_SECONDS") or defaults.event_retention_seconds
        ),
        event_queue_size=int(env.get("CALLPLANE_EVENT_QUEUE_SIZE") or defaults.event_queue_size),
        event_poll_interval_seconds=float(
            env.get("CALLPLANE_EVENT_POLL_INTERVAL_SECONDS") or defaults.event_poll_interval_seconds
        ),
        lease_ttl_seconds=float(env.get("CALLPLANE_LEASE_TTL_SECONDS") or defaults.lease_ttl_seconds),
        metrics_listen=pick("metrics_listen", "CALLPLANE_METRICS_LISTEN") or "",
        api_secret=_secret(pick("api_secret_file", "CALLPLANE_API_SECRET_FILE"), env),
        custom_indexes=_custom_indexes(args, env),
        require_indexes=_bool(pick("require_indexes", "CALLPLANE_REQUIRE_INDEXES") or "false"),
        webhook_allow_private=_bool(
            pick("webhook_allow_private", "CALLPLANE_WEBHOOK_ALLOW_PRIVATE") or "false"
        ),
        webhook_retry_period_seconds=float(
            pick("webhook_retry_period", "CALLPLANE_WEBHOOK_RETRY_PERIOD_SECONDS")
            or defaults.webhook_retry_period_seconds
        ),
        webhook_timeout_seconds=float(
            pick("webhook_timeout", "CALLPLANE_WEBHOOK_TIMEOUT_SECONDS") or defaults.webhook_timeout_seconds
        ),
        webhook_concurrency=int(
            pick("webhook_concurrency", "CALLPLANE_WEBHOOK_CONCURRENCY") or defaults.webhook_concurrency
        ),
        webhook_lease_seconds=float(
            env.get("CALLPLANE_WEBHOOK_LEASE_SECONDS") or defaults.webhook_lease_seconds
        ),
    )


def _log_format(value: str) -> str:
    text = value.strip().lower()
    if text not in ("text", "json"):
        raise ValueError(f"CALLPLANE_LOG_FORMAT must be text or json, not {value!r}")
    return text


def _custom_indexes(args: argparse.Namespace | None, env: Mapping[str, str]) -> tuple[CustomIndex, ...]:
    specs = getattr(args, "custom_index", None) if args is not None else None
    if not specs:
        specs = [spec for spec in env.get("CALLPLANE_CUSTOM_INDEXES", "").split(";") if spec.strip()]
    return tuple(parse_custom_index(spec) for spec in specs)
