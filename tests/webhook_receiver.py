"""A local HTTP receiver for webhook deliveries (aiohttp's test server on 127.0.0.1): records every
request it gets and answers with the status a test sets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

#: How long a test waits for a delivery before it fails (a delivery normally arrives in milliseconds).
DELIVERY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Delivery:
    """One request as the receiver got it: headers as sent, the body's exact bytes."""

    headers: dict[str, str]
    body: bytes

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def signatures(self) -> list[str]:
        return self.headers["webhook-signature"].split(" ")

    def event(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


class Receiver:
    """`async with Receiver() as receiver:` serves `receiver.url`; `await receiver.next()` is the next
    request received. `status` is what it answers (200 unless a test changes it), or `answer` decides
    (a coroutine taking the delivery: it may wait, redirect, fail...)."""

    def __init__(self, path: str = "/hook") -> None:
        self.path = path
        self.status = 200
        self.answer: Callable[[Delivery], Awaitable[web.StreamResponse]] | None = None
        self.received: list[Delivery] = []
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        app = web.Application()
        app.router.add_post(path, self._handle)
        self._server = TestServer(app, host="127.0.0.1", port=0)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        # Lower-cased names: HTTP header names are case-insensitive, and the libraries look them up so.
        delivery = Delivery({k.lower(): v for k, v in request.headers.items()}, await request.read())
        self.received.append(delivery)
        self._queue.put_nowait(delivery)
        if self.answer is not None:
            return await self.answer(delivery)
        return web.Response(status=self.status)

    async def __aenter__(self) -> Receiver:
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}{self.path}"

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self._queue.get(), DELIVERY_TIMEOUT_S)

    async def next_where(self, predicate: Callable[[Delivery], bool]) -> Delivery:
        """The next request `predicate(delivery)` accepts (earlier ones are passed over)."""

        async def find() -> Delivery:
            while True:
                delivery = await self._queue.get()
                if predicate(delivery):
                    return delivery

        return await asyncio.wait_for(find(), DELIVERY_TIMEOUT_S)
