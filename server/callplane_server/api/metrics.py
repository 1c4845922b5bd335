"""Prometheus metrics for RPCs, named as grpc-ecosystem's go-grpc-prometheus names them, so existing
dashboards and alerts work: `grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`
and `grpc_server_handling_seconds` (unary RPCs). Served over HTTP at /metrics when configured."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RpcMetrics:
    """Counters per server (its own registry, so several servers can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self._seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle a unary RPC, from authentication to the reply.",
            ["grpc_type", "grpc_service", "grpc_method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # labels() takes a lock and builds a key each time; RPC paths and codes are few, so keep the children.
        self._counters: dict[tuple[str, str], Callable[[], None]] = {}
        self._timers: dict[str, Callable[[float], None]] = {}
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    def handled(self, method: str, kind: str, code: str, seconds: float) -> None:
        key = (method, code)
        increment = self._counters.get(key)
        if increment is None:
            service, name = _split(method)
            increment = self._handled.labels(kind, service, name, code).inc
            self._counters[key] = increment
        increment()
        if kind == "unary":
            observe = self._timers.get(method)
            if observe is None:
                service, name = _split(method)
                observe = self._seconds.labels(kind, service, name).observe
                self._timers[method] = observe
            observe(seconds)

    def serve(self, listen: str) -> int:
        """Serves /metrics on `host:port` (port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        self._http, self._http_thread = start_http_server(
            int(port), addr=host or "0.0.0.0", registry=self.registry
        )
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host or "0.0.0.0", bound)
        return int(bound)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.strip("/").partition("/")
    return service, name
