"""The event hub offers an event only to the subscriptions that may want it: the watchers of its call, the
inboxes (WatchUser) of its recipients and the firehose subscriptions. Not to every subscription: a server
holding thousands of idle watch streams on other calls must not run thousands of matchers per event."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from callplane.v1 import event_pb2
from callplane_server.events import hub as hub_module
from callplane_server.events.hub import EventHub, Recipients
from callplane_server.store import Store
from callplane_server.store.events import StoredEvent


def _event(position: int, cid: str) -> StoredEvent:
    message = event_pb2.Event(type="custom", call_cid=cid, seq=position, position=position)
    return StoredEvent(position, cid, cid.partition(":")[0], position, "custom", message)


def test_an_event_reaches_only_its_calls_watchers_its_recipients_and_the_firehose() -> None:
    hub = EventHub(cast(Store, object()))  # dispatching reads nothing
    asked: dict[str, int] = {}

    def matcher(name: str) -> Any:
        def match(stored: StoredEvent, recipients: Recipients) -> StoredEvent:
            asked[name] = asked.get(name, 0) + 1
            return stored

        return match

    others = [hub.subscribe(matcher(f"other-{i}"), call_cid=f"default:other-{i}") for i in range(200)]
    hub.subscribe(matcher("watcher"), call_cid="default:hot")
    hub.subscribe(matcher("inbox"), user_id="alice")
    hub.subscribe(matcher("bob's inbox"), user_id="bob")
    hub.subscribe(matcher("firehose"))

    hub._dispatch([_event(1, "default:hot")], {1: [("alice", 7)]})
    assert asked == {"watcher": 1, "inbox": 1, "firehose": 1}
    assert hub.last_position == 1

    for subscription in others:
        hub.unsubscribe(subscription)
    assert "default:other-0" not in hub._by_call  # emptied per-call sets do not linger
    assert hub.subscriber_count == 4


async def test_an_idle_subscription_waits_without_a_timer_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream that asked for no progress waits on its future alone (no timer per idle stream); one that
    asked gets a timer per wait, and None when it runs out."""
    hub = EventHub(cast(Store, object()))
    subscription = hub.subscribe(lambda stored, recipients: stored, call_cid="default:a")
    loop = asyncio.get_running_loop()
    timers: list[float] = []
    call_later = loop.call_later

    def recording(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if callback is hub_module._resolve:
            timers.append(delay)
        return call_later(delay, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_later", recording)
    waiting = asyncio.ensure_future(subscription.next())
    await asyncio.sleep(0)
    assert not waiting.done()
    assert timers == []
    subscription.offer(_event(1, "default:a"))
    item = await waiting
    assert isinstance(item, StoredEvent) and item.position == 1
    assert await subscription.next(0.001) is None
    assert timers == [0.001]


class _Log:
    """A store whose event log answers the tailer's two questions and records which were asked."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.events = self
        self.committing: set[int] = set()

    async def read(self, work: Any) -> Any:
        return await work(self)

    async def last_position(self) -> int:
        self.asked.append("last_position")
        return 42

    async def events_after_position(self, after: int, limit: int) -> list[StoredEvent]:
        self.asked.append(f"events_after_position({after})")
        return []


async def test_with_nobody_subscribed_the_tailer_reads_no_events() -> None:
    log = _Log()
    hub = EventHub(cast(Store, log))
    assert await hub.poll() == 0
    assert log.asked == ["last_position"]  # not a single event read or decoded
    assert hub.last_position == 42  # a stream subscribing later catches up from the log after its own cursor

    hub.subscribe(lambda stored, recipients: stored, call_cid="default:x")
    log.asked.clear()
    await hub.poll()
    assert log.asked == ["events_after_position(42)"]


def test_a_notification_of_a_commit_already_dispatched_reads_nothing() -> None:
    """On PostgreSQL each commit NOTIFYs its last position; this process's own commits were dispatched
    from what they wrote, so their notifications must not make the tailer read them back."""
    log = _Log()
    hub = EventHub(cast(Store, log))
    hub.last_position = 10
    hub._notified("9")
    hub._notified("10")
    assert not hub._doorbell.is_set()
    log.committing.add(12)  # a commit of this process, about to hand its events over
    hub._notified("12")
    assert not hub._doorbell.is_set()
    hub._notified("11")  # another replica's commit
    assert hub._doorbell.is_set()
    hub._doorbell.clear()
    hub._notified("")  # (re)connected: something may have been missed
    assert hub._doorbell.is_set()
