"""The session and timer repositories' prebuilt statements, on both backends: the timer upsert, the joiner
lookup (user, teams, member role and overrides in one query) and the session-with-participants read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from callplane_server.domain.records import ParticipantRecord, SessionRecord
from callplane_server.store.models import (
    CallMemberRow,
    CallRow,
    CallTypeRow,
    PermissionOverrideRow,
    UserRow,
    UserTeamRow,
)
from callplane_server.store.sessions import SessionRepository
from callplane_server.store.timers import TimerRepository

NOW = datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


async def test_schedule_inserts_then_moves_the_one_timer(session: AsyncSession) -> None:
    timers = TimerRepository(session)
    await timers.schedule("lease", "default:t1", NOW, key="p1", payload={"session_id": "s1"})
    first = await timers.get("lease", "default:t1", "p1")
    assert first is not None and first.due_at == NOW and first.payload == {"session_id": "s1"}
    later = NOW + timedelta(seconds=30)
    await timers.schedule("lease", "default:t1", later, key="p1", payload={"session_id": "s2"})
    moved = await timers.get("lease", "default:t1", "p1")
    assert moved is not None
    assert (moved.id, moved.due_at, moved.payload) == (first.id, later, {"session_id": "s2"})
    await timers.schedule("lease", "default:t1", NOW, key="p2")
    await timers.schedule("other", "default:t1", NOW)
    assert [(t.kind, t.key) for t in await timers.pending("default:t1")] == [
        ("lease", "p2"),
        ("other", ""),
        ("lease", "p1"),
    ]
    await timers.cancel("lease", "default:t1", key="p2")
    assert await timers.get("lease", "default:t1", "p2") is None
    assert await timers.get("lease", "default:t1", "p1") is not None
    await timers.cancel("lease", "default:t1")
    assert [t.kind for t in await timers.pending("default:t1")] == ["other"]
    await session.rollback()


async def test_joiner_reads_user_teams_role_and_overrides(session: AsyncSession) -> None:
    repository = SessionRepository(session)
    session.add(CallTypeRow(name="t-j", settings={}, grants={}, created_at=NOW, updated_at=NOW))
    await session.flush()
    session.add(CallRow(cid="default:j", type="t-j", id="j", created_at=NOW, updated_at=NOW))
    await session.flush()
    for user_id, role in (("j-alice", "admin"), ("j-bob", "user")):
        session.add(
            UserRow(id=user_id, name=user_id, role=role, custom={"a": 1}, created_at=NOW, updated_at=NOW)
        )
    await session.flush()
    session.add_all([UserTeamRow(user_id="j-alice", team=team) for team in ("red", "blue")])
    session.add(
        CallMemberRow(
            call_cid="default:j", user_id="j-alice", role="host", custom={}, created_at=NOW, updated_at=NOW
        )
    )
    session.add(
        PermissionOverrideRow(
            call_cid="default:j", user_id="j-alice", granted=["kick-user"], revoked=["screenshare"]
        )
    )
    # Another call's standing does not leak in.
    session.add(
        PermissionOverrideRow(call_cid="default:k", user_id="j-bob", granted=["kick-user"], revoked=[])
    )
    await session.flush()

    alice = await repository.joiner("default:j", "j-alice")
    assert alice is not None
    assert (alice.user.id, alice.user.role, alice.user.teams, alice.user.custom) == (
        "j-alice",
        "admin",
        ["blue", "red"],
        {"a": 1},
    )
    assert alice.user.created_at == NOW
    assert (alice.member_role, alice.overrides) == ("host", (["kick-user"], ["screenshare"]))
    bob = await repository.joiner("default:j", "j-bob")
    assert bob is not None
    assert (bob.user.teams, bob.member_role, bob.overrides) == ([], None, ([], []))
    assert await repository.joiner("default:j", "j-nobody") is None
    await session.rollback()


def _participant(session_id: str, psid: str, joined: int, *, left: bool = False) -> ParticipantRecord:
    return ParticipantRecord(
        session_id=session_id,
        participant_session_id=psid,
        call_cid="default:w",
        user_id=f"user-{psid}",
        role="user",
        custom={"n": joined},
        custom_version=1,
        published_tracks=["audio"],
        joined_at=NOW + timedelta(seconds=joined),
        left_at=NOW + timedelta(seconds=50) if left else None,
        left_reason="left" if left else "",
        lease_expires_at=None if left else NOW + timedelta(seconds=60),
    )


async def test_session_with_participants(session: AsyncSession) -> None:
    repository = SessionRepository(session)
    assert await repository.with_participants("missing", "p1") == (None, [], None)
    record = SessionRecord(
        id="s-w", call_cid="default:w", started_at=NOW, custom={"k": "v"}, custom_version=2
    )
    await repository.insert(record)
    assert await repository.with_participants("s-w", "p1") == (record, [], None)

    await repository.insert_participant(_participant("s-w", "p2", 2))
    await repository.insert_participant(_participant("s-w", "p1", 1))
    await repository.insert_participant(_participant("s-w", "gone", 0, left=True))
    await repository.insert_participant(_participant("s-w", "gone2", 0, left=True))
    live = [_participant("s-w", "p1", 1), _participant("s-w", "p2", 2)]

    found, people, one = await repository.with_participants("s-w", "p2")
    assert (found, people) == (record, live)
    assert one is people[1]
    assert await repository.live_and_one("s-w", "p2") == (live, live[1])
    found, people, one = await repository.with_participants("s-w", "gone")
    assert (people, one) == (live, _participant("s-w", "gone", 0, left=True))
    assert await repository.live_and_one("s-w", "nobody") == (live, None)
    assert await repository.live_participants("s-w") == live

    changed = _participant("s-w", "p1", 1)
    changed.published_tracks, changed.custom_version = ["video"], 3
    await repository.save_participant(changed)
    assert await repository.get_participant("s-w", "p1") == changed
    assert await repository.find_participant("default:w", "p1") == changed
    record.ended_at, record.end_reason = NOW, "inactivity"
    await repository.save(record)
    assert await repository.get("s-w") == record
    await session.rollback()


async def test_taking_hold_costs_two_statements_a_batch_and_release_gives_leases_back(
    session: AsyncSession,
) -> None:
    """Streams of one replica take hold of their participants together: the rows and the lease timers, in
    two statements whatever their number; a participant that left is not held (nor reported live). When
    the replica's lease runs out, one statement gives everyone it held a lease of their own again."""
    repository = SessionRepository(session)
    timers = TimerRepository(session)
    await repository.insert(SessionRecord(id="s-r", call_cid="default:w", started_at=NOW))
    held = []
    for index in range(40):
        psid = f"r{index}"
        await repository.insert_participant(_participant("s-r", psid, index, left=index == 7))
        await timers.schedule("participant_lease", "default:w", NOW, key=psid, payload={"session_id": "s-r"})
        held.append(("default:w", psid))
    await timers.schedule("participant_lease", "default:other", NOW, key="r1")  # another call's: untouched

    executed = 0
    execute = session.execute

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal executed
        executed += 1
        return await execute(*args, **kwargs)  # type: ignore[arg-type]

    session.execute = counting  # type: ignore[method-assign]
    try:
        live = await repository.take_hold([*held, ("default:w", "nobody")], "replica-a")
    finally:
        session.execute = execute  # type: ignore[method-assign]
    assert executed == 2
    assert live == {key for key in held if key[1] != "r7"}
    taken = await repository.get_participant("s-r", "r3")
    assert taken is not None and (taken.held_by, taken.lease_expires_at) == ("replica-a", None)
    assert await timers.get("participant_lease", "default:w", "r3") is None
    left = await repository.get_participant("s-r", "r7")
    assert left is not None and left.held_by is None
    other = await timers.get("participant_lease", "default:other", "r1")
    assert other is not None and other.due_at == NOW

    # A save of a participant read before the hold does not undo it.
    assert taken is not None
    taken.held_by = None
    await repository.save_participant(taken)
    reread = await repository.get_participant("s-r", "r3")
    assert reread is not None and reread.held_by == "replica-a"

    await repository.take_hold([("default:w", "r5")], "replica-b")  # moved to another replica
    expired = NOW + timedelta(seconds=30)
    released = await repository.release_held("replica-a", expired)
    assert sorted(p.participant_session_id for p in released) == sorted(
        psid for _, psid in live if psid != "r5"
    )
    assert all(p.held_by is None and p.lease_expires_at == expired for p in released)
    moved = await repository.get_participant("s-r", "r5")
    assert moved is not None and moved.held_by == "replica-b"
    assert await repository.release_held("replica-a", expired) == []
    await session.rollback()
