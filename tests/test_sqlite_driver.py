"""The embedded SQLite driver runs statements inline and commits on aiosqlite's thread; these check that
durability settings and transaction outcomes are what they were with the stock driver."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.store.database import Database


@pytest.fixture
async def database(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'driver.db'}")
    await database.run(
        lambda session: session.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")),
        write=True,
    )
    yield database
    await database.dispose()


async def _pragmas(session: AsyncSession) -> tuple[str, int, int]:
    journal = (await session.execute(text("PRAGMA journal_mode"))).scalar_one()
    synchronous = (await session.execute(text("PRAGMA synchronous"))).scalar_one()
    foreign_keys = (await session.execute(text("PRAGMA foreign_keys"))).scalar_one()
    return journal, synchronous, foreign_keys


async def test_writer_and_readers_keep_wal_and_synchronous_full(database: Database) -> None:
    assert await database.run(_pragmas, write=True) == ("wal", 2, 1)
    assert await database.run(_pragmas, write=False) == ("wal", 2, 1)


async def test_a_committed_write_is_on_disk_for_another_connection(
    database: Database, tmp_path: Path
) -> None:
    async def write(session: AsyncSession) -> int:
        result = await session.execute(text("INSERT INTO notes (body) VALUES ('kept')"))
        return int(result.lastrowid)

    row_id = await database.run(write, write=True)
    with sqlite3.connect(tmp_path / "driver.db") as other:
        assert other.execute("SELECT body FROM notes WHERE id = ?", (row_id,)).fetchall() == [("kept",)]


async def test_a_failed_unit_writes_nothing(database: Database, tmp_path: Path) -> None:
    async def write_then_fail(session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO notes (body) VALUES ('lost')"))
        raise ValueError("rules said no")

    with pytest.raises(ValueError):
        await database.run(write_then_fail, write=True)
    rows = await database.run(
        lambda session: session.execute(text("SELECT count(*) FROM notes")), write=False
    )
    assert rows.scalar_one() == 0


async def test_only_blocking_statements_leave_the_event_loop(database: Database) -> None:
    # BEGIN IMMEDIATE may wait for the write lock and a writing COMMIT fsyncs: both run on aiosqlite's
    # thread so they cannot stall every other RPC; the statements between them run on the loop.
    traced: list[tuple[str, bool]] = []
    loop_thread = threading.current_thread()

    def on_statement(statement: str) -> None:
        traced.append((statement.split()[0].upper(), threading.current_thread() is loop_thread))

    async def trace(session: AsyncSession) -> None:
        driver_connection = (await (await session.connection()).get_raw_connection()).driver_connection
        driver_connection.sqlite.set_trace_callback(on_statement)

    async def write(session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO notes (body) VALUES ('x')"))

    await database.run(trace, write=True)
    traced.clear()
    await database.run(write, write=True)
    # Each unit of a group commit runs under its own SAVEPOINT, released on the loop.
    assert traced == [
        ("BEGIN", False),
        ("SAVEPOINT", True),
        ("INSERT", True),
        ("RELEASE", True),
        ("COMMIT", False),
    ]
