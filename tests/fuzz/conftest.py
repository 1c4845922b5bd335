"""Prints the fuzz run's figures: requests per backend, status codes, refusals checked for no change."""

from __future__ import annotations

import pytest

from tests.fuzz import stats


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = stats.summary()
    if lines:
        terminalreporter.section("fuzz")
        for line in lines:
            terminalreporter.write_line(line)
