"""A seeded database for the bench, reused between runs when the seed is the same.

Seeding 100,000 calls through the API takes minutes, so the first run keeps what it seeded, keyed by a
hash of everything the seed depends on: the seed parameters, servers.SEED_FORMAT and the source of
servers.custom_for and the ids, the custom indexes the server declares and the schema's Alembic head
revision (a new migration reseeds). SQLite: a copy of the database file in the cache folder
(`~/.cache/callplane-bench/<key>.db`, or $CALLPLANE_BENCH_CACHE), copied into the run's folder. PostgreSQL:
a database `callplane_bench_seed_<key>` next to the run's, which each run's database is created from
(`CREATE DATABASE … TEMPLATE …`). A seed is stored under its final name only once complete, so an
interrupted one is done again.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from tests.bench import servers

MIGRATIONS = servers.REPO / "server" / "callplane_server" / "store" / "migrations" / "versions"
TEMPLATE_PREFIX = "callplane_bench_seed_"
_REVISION = re.compile(r"^revision(?:\s*:\s*[^=]+)?\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)
_DOWN = re.compile(r"^down_revision(?:\s*:\s*[^=]+)?\s*=\s*(.+)$", re.MULTILINE)


def cache_folder() -> Path:
    configured = os.environ.get("CALLPLANE_BENCH_CACHE")
    if configured:
        return Path(configured)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "callplane-bench"


def alembic_heads(folder: Path | None = None) -> list[str]:
    """The schema's head revision(s): revisions no other revision names as its down_revision."""
    folder = folder or MIGRATIONS
    revisions: set[str] = set()
    downs: set[str] = set()
    for path in folder.glob("*.py"):
        text = path.read_text()
        found = _REVISION.search(text)
        if not found:
            continue
        revisions.add(found.group(1))
        down = _DOWN.search(text)
        if down:
            downs.update(re.findall(r"['\"]([^'\"]+)['\"]", down.group(1)))
    heads = sorted(revisions - downs)
    if not heads:
        raise SystemExit(f"no Alembic head revision found in {folder}")
    return heads


def seed_key(*, calls: int, users: int, members_per_call: int) -> str:
    """What a seeded database depends on, hashed (16 hex digits)."""
    code = "".join(
        inspect.getsource(function) for function in (servers.custom_for, servers.call_id, servers.user_id)
    )
    described = {
        "calls": calls,
        "users": users,
        "members_per_call": members_per_call,
        "call_type": servers.CALL_TYPE,
        "format": servers.SEED_FORMAT,
        "custom_indexes": list(servers.CUSTOM_INDEXES),
        "alembic_heads": alembic_heads(),
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


#: Server processes seeding a PostgreSQL database (replicas on the one database: seeding is server-bound).
POSTGRES_SEED_SERVERS = 2


async def _seed_with_server(database_url: str, folder: Path, token: str, label: str, **params: int) -> None:
    """Runs the server (PostgreSQL: several, on the one database) on `database_url` (the schema made by
    its migrations), seeds through the API and stops it (so the database is complete and nobody is
    connected)."""
    started = time.monotonic()
    count = 1 if database_url.startswith("sqlite") else POSTGRES_SEED_SERVERS
    with contextlib.ExitStack() as stack:
        started_servers = []
        for n in range(count):  # one after the other: the first one migrates the schema
            server = stack.enter_context(
                servers.callplane(database_url, folder, servers.free_port(), log_name=f"seed-{n}.log")
            )
            await servers.wait_serving(server)
            started_servers.append(server)
        rate = await servers.seed([s.target for s in started_servers], token, label=label, **params)
    print(
        f"{label}seeded {params['calls']:,} calls x {params['members_per_call']} members and "
        f"{params['users']:,} users in {time.monotonic() - started:.0f} s ({rate:,.0f} calls/s)",
        flush=True,
    )


@contextlib.asynccontextmanager
async def seeded_database(
    backend: str,
    folder: Path,
    postgres_url: str,
    token: str,
    *,
    calls: int,
    users: int,
    members_per_call: int,
    reuse: bool = True,
) -> AsyncIterator[str]:
    """A database for this run, with the seed in it: a copy of the cached seed, made first if missing
    (or always fresh, and not kept, when `reuse` is false)."""
    params = {"calls": calls, "users": users, "members_per_call": members_per_call}
    key = seed_key(**params)
    label = f"[{backend}] "
    if backend == "sqlite":
        run_path = folder / "callplane-bench.db"
        if not reuse:
            await _seed_with_server(f"sqlite:///{run_path}", folder, token, label, **params)
        else:
            cached = await _cached_sqlite(key, folder, token, label, params)
            started = time.monotonic()
            shutil.copyfile(cached, run_path)
            print(
                f"{label}seed reused: {cached} copied in {time.monotonic() - started:.1f} s",
                flush=True,
            )
        yield f"sqlite:///{run_path}"
        return
    async with _postgres_seeded(key, folder, postgres_url, token, label, params, reuse) as url:
        yield url


async def _cached_sqlite(key: str, folder: Path, token: str, label: str, params: dict[str, int]) -> Path:
    cache = cache_folder()
    cache.mkdir(parents=True, exist_ok=True)
    cached = cache / f"{key}.db"
    if cached.exists():
        return cached
    print(f"{label}no seeded database cached as {cached}: seeding", flush=True)
    seeding = folder / f"seeding-{key}.db"
    await _seed_with_server(f"sqlite:///{seeding}", folder, token, label, **params)
    # One self-contained file (the WAL folded in), written next to its final name, then renamed.
    partial = cache / f"{key}.{uuid.uuid4().hex[:8]}.partial"
    with (
        contextlib.closing(sqlite3.connect(seeding)) as source,
        contextlib.closing(sqlite3.connect(partial)) as target,
    ):
        source.backup(target)
    partial.replace(cached)
    seeding.unlink()
    print(f"{label}seeded database cached as {cached}", flush=True)
    return cached


@contextlib.asynccontextmanager
async def _postgres_seeded(
    key: str,
    folder: Path,
    postgres_url: str,
    token: str,
    label: str,
    params: dict[str, int],
    reuse: bool,
) -> AsyncIterator[str]:
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_url)
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    template = TEMPLATE_PREFIX + key
    name = f"callplane_bench_{uuid.uuid4().hex[:12]}"

    async def admin(statement: str) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await connection.execute(statement)
        finally:
            await connection.close()

    async def exists(database: str) -> bool:
        connection = await asyncpg.connect(dsn)
        try:
            return bool(await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database))
        finally:
            await connection.close()

    async def analyze(database: str) -> None:
        connection = await asyncpg.connect(
            base.set(drivername="postgresql", database=database).render_as_string(hide_password=False)
        )
        try:
            await connection.execute("ANALYZE")
        finally:
            await connection.close()

    def url(database: str) -> str:
        return base.set(database=database).render_as_string(hide_password=False)

    try:
        if not reuse:
            await admin(f'CREATE DATABASE "{name}"')
            await _seed_with_server(url(name), folder, token, label, **params)
        else:
            if not await exists(template):
                print(f"{label}no seeded template database {template}: seeding", flush=True)
                partial = f"callplane_bench_seeding_{key}_{uuid.uuid4().hex[:6]}"
                await admin(f'CREATE DATABASE "{partial}"')
                try:
                    await _seed_with_server(url(partial), folder, token, label, **params)
                    # Statistics, as autovacuum would gather after such a load (it may not have yet):
                    # without them PostgreSQL's planner guesses the selectivity of custom-data filters.
                    await analyze(partial)
                    await admin(f'ALTER DATABASE "{partial}" RENAME TO "{template}"')
                except BaseException:
                    await admin(f'DROP DATABASE IF EXISTS "{partial}" WITH (FORCE)')
                    raise
                print(f"{label}seeded database kept as the template {template}", flush=True)
            started = time.monotonic()
            # FILE_COPY: a copy of the files (the default WAL_LOG writes every page to the WAL).
            await admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}" STRATEGY FILE_COPY')
            print(
                f"{label}seed reused: database {name} created from {template} in "
                f"{time.monotonic() - started:.1f} s",
                flush=True,
            )
        yield url(name)
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
