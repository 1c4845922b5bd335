"""Resumable event streams: async iterators over WatchCall / WatchUser / SubscribeEvents that reconnect
after a dropped connection and resume exactly after the last seq (or user_seq, or position) they saw.

The server's guarantees (ordered, unique, gap-free, resumable) make this simple: remember the last number
seen (events and progress messages both advance it) and reconnect with `after_seq` / `after_position` set
to it. Progress messages come once when a stream starts from now and, only when asked for with
`progress_interval`, on an idle stream; an idle stream that did not ask receives nothing (HTTP/2 keepalive,
set on the channel, is what notices a dead connection). Reconnection backs off exponentially with jitter
(tenacity) and gives up after `give_up_after` seconds of continuous failure. A resume point the server
no longer retains raises `CallplaneError` (FAILED_PRECONDITION `EVENTS_COMPACTED`): the caller must re-read
state (e.g. `watch(snapshot=True)`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, stop_never, wait_random_exponential

from callplane.client.errors import CallplaneError
from callplane.client.models import CallSnapshotMessage, EventMessage, ProgressMessage, StreamMessage

if TYPE_CHECKING:
    from callplane.client.client import CallplaneClient

__all__ = ["RESUMABLE_CODES", "EventStream", "Reconnect"]

#: Codes after which a stream reconnects: the server went away (UNAVAILABLE, including its
#: `SHUTTING_DOWN` on a graceful stop) or cancelled the call from its side while stopping.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True)
class Reconnect:
    """How a stream reconnects: exponential backoff with jitter from `initial_backoff` up to
    `max_backoff` seconds; it gives up (raising the last error) after `give_up_after` seconds of failing
    to reconnect (None: never)."""

    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    give_up_after: float | None = 60.0


def set_progress_interval(request: Any, seconds: float | None) -> None:
    """Sets a stream request's `progress_interval` (None or 0: no periodic progress; the server raises a
    value below its minimum to it, and refuses a negative one)."""
    if seconds:
        request.progress_interval.FromNanoseconds(round(seconds * 1_000_000_000))


class _StreamEnded(Exception):
    """The server closed a stream that never ends by contract; treated like a dropped connection."""


class _Closed(Exception):
    """`close()` was called while (re)connecting."""


def _resumable(error: BaseException) -> bool:
    if isinstance(error, _StreamEnded):
        return True
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in RESUMABLE_CODES


class EventStream(AsyncIterator[StreamMessage]):
    """An async iterator of `CallSnapshotMessage` / `EventMessage` / `ProgressMessage` that survives
    dropped connections. `cursor` is the last seq (user_seq, position) delivered or confirmed by
    progress: the point it resumes after. Use it as ``async for message in stream`` (or
    ``async with stream``) and `close()` it when done (breaking out of the loop also closes it)."""

    def __init__(
        self,
        client: CallplaneClient,
        method: Callable[..., grpc.aio.UnaryStreamCall[Any, Any]],
        make_request: Callable[[int | None], Any],
        key: Callable[[Any], int],
        *,
        cursor: int | None,
        reconnect: Reconnect,
        include_progress: bool = True,
    ) -> None:
        self._client = client
        self._method = method
        self._make_request = make_request
        self._key = key
        self._reconnect = reconnect
        self._include_progress = include_progress
        #: The resume point: the last number seen (None until the first event or progress message).
        self.cursor = cursor
        #: How many times the stream reconnected.
        self.reconnects = 0
        self._call: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._iterator: AsyncIterator[StreamMessage] | None = None
        self._closed = False
        self._connected = False

    @property
    def connected(self) -> bool:
        """Whether a call is open and set up now (False before the first connect and while reconnecting)."""
        return self._connected

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> StreamMessage:
        if self._iterator is None:
            self._iterator = self._run()
        return await self._iterator.__anext__()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel the underlying call and end the iteration (a task iterating it gets
        StopAsyncIteration)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        iterator: Any = self._iterator
        if iterator is not None and not iterator.ag_running:
            await iterator.aclose()

    async def _open(self) -> grpc.aio.UnaryStreamCall[Any, Any]:
        """Start a call at the current resume point and wait until the server has set it up: its response
        headers, which come with the first message or, from a stream with nothing to send yet (resumed,
        idle, no progress asked for), alone. A server that is still down, or refuses the stream, fails
        here, inside the retry loop; waiting for a first message instead could wait for as long as the
        call stays idle, which would count as failing time."""
        if self._closed:
            raise _Closed()
        metadata = await self._client._call_metadata()
        call = self._method(self._make_request(self.cursor), metadata=metadata or None)
        self._call = call
        try:
            await call.initial_metadata()
            # Ended before it started: read() raises its error (EOF: it ended without one).
            if call.done() and await call.read() is grpc.aio.EOF:
                raise _StreamEnded()
        except BaseException:
            call.cancel()
            raise
        self._connected = True
        return call

    def _retrying(self) -> AsyncRetrying:
        policy = self._reconnect

        def before_sleep(_state: Any) -> None:
            self.reconnects += 1

        return AsyncRetrying(
            retry=retry_if_exception(_resumable),
            wait=wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff),
            stop=stop_never if policy.give_up_after is None else stop_after_delay(policy.give_up_after),
            before_sleep=before_sleep,
            reraise=True,
        )

    async def _run(self) -> AsyncIterator[StreamMessage]:
        call: grpc.aio.UnaryStreamCall[Any, Any]  # AsyncRetrying's call leaves _open's types behind
        message: Any
        dropped = False
        while not self._closed:
            try:
                if dropped:
                    self.reconnects += 1
                call = await self._retrying()(self._open)
            except _Closed:
                return
            except asyncio.CancelledError:
                if self._closed:
                    return
                raise
            except grpc.aio.AioRpcError as error:
                raise CallplaneError.from_rpc_error(error) from error
            except _StreamEnded as error:
                raise CallplaneError(
                    grpc.StatusCode.UNAVAILABLE, "the server kept ending the stream"
                ) from error
            try:
                while (message := await call.read()) is not grpc.aio.EOF:  # EOF is not expected: reconnect
                    converted = self._convert(message)
                    if converted is not None:
                        yield converted
            except grpc.aio.AioRpcError as error:
                if not _resumable(error):
                    raise CallplaneError.from_rpc_error(error) from error
            except asyncio.CancelledError:
                if self._closed:  # close() cancelled the call under a pending read
                    return
                raise
            finally:
                self._connected = False
                call.cancel()
            dropped = True

    def _convert(self, message: Any) -> StreamMessage | None:
        kind = message.WhichOneof("message")
        if kind == "snapshot":
            self.cursor = message.snapshot.seq
            return CallSnapshotMessage.from_proto(message.snapshot)
        if kind == "progress":
            if self.cursor is None or message.progress.seq > self.cursor:
                self.cursor = message.progress.seq
            return ProgressMessage.from_proto(message.progress) if self._include_progress else None
        if kind == "event":
            key = self._key(message.event)
            if self.cursor is not None and key <= self.cursor:
                return None  # already delivered (defensive; the server does not resend)
            self.cursor = key
            return EventMessage.from_proto(message.event)
        return None
