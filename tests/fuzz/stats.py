"""Counts of what the fuzz run sent and got back, printed at the end of the run (tests/fuzz/conftest.py)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import grpc

# FUZZ_TRACE=path appends one line per request (backend, RPC, token, code, details): what the fuzzer sends.
_TRACE = os.environ.get("FUZZ_TRACE", "")

codes: Counter[tuple[str, str]] = Counter()
state_compared: Counter[str] = Counter()
rpcs: dict[str, set[str]] = {}


def record(backend: str, path: str, code: grpc.StatusCode) -> None:
    codes[(backend, code.name)] += 1
    rpcs.setdefault(backend, set()).add(path)


def compared(backend: str) -> None:
    state_compared[backend] += 1


def summary() -> list[str]:
    lines = []
    for backend in sorted({b for b, _ in codes}):
        total = sum(n for (b, _), n in codes.items() if b == backend)
        by_code = ", ".join(f"{name} {n}" for (b, name), n in codes.most_common() if b == backend)
        lines.append(
            f"{backend}: {total} requests to {len(rpcs.get(backend, ()))} RPCs; "
            f"{state_compared[backend]} refused, each with unchanged state; {by_code}"
        )
    return lines


def trace(line: str) -> None:
    if _TRACE:
        with Path(_TRACE).open("a") as out:
            out.write(line + "\n")
