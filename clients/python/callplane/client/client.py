"""`CallplaneClient`: the asyncio entry point over the generated stubs."""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

try:  # optional: with OpenTelemetry installed, calls carry the caller's trace context (`traceparent`)
    from opentelemetry import propagate as _propagate
except ImportError:  # pragma: no cover - opentelemetry-api is installed with the server
    _propagate = None  # type: ignore[assignment]

from callplane.client.call import Call
from callplane.client.convert import (
    SettingsLike,
    SortLike,
    dict_to_struct,
    to_delivery_status,
    to_duration,
    to_grants,
    to_partial_updates,
    to_settings,
    to_sort_params,
    to_user_requests,
)
from callplane.client.errors import CallplaneError
from callplane.client.models import (
    CallState,
    CallTypeInfo,
    QueryPage,
    UserInfo,
    WebhookDeliveryInfo,
    WebhookInfo,
    WebhookRedelivery,
    WebhookSecret,
)
from callplane.client.streams import EventStream, Reconnect, set_progress_interval
from callplane.v1 import (
    call_data_service_pb2_grpc,
    call_service_pb2,
    call_service_pb2_grpc,
    call_type_service_pb2,
    call_type_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    ring_service_pb2_grpc,
    session_service_pb2_grpc,
    user_pb2,
    user_pb2_grpc,
    webhook_service_pb2,
    webhook_service_pb2_grpc,
)

__all__ = ["DEFAULT_TIMEOUT", "SERVICE_CONFIG", "CallplaneClient", "TokenProvider"]

#: Seconds each RPC may take unless the client is built with another `timeout`.
DEFAULT_TIMEOUT = 10.0

#: The gRPC service config (JSON) this client's channels use: retries on UNAVAILABLE, with exponential
#: backoff, for the idempotent RPCs only (protos/callplane/v1/callplane_grpc_service_config.json).
SERVICE_CONFIG: str = (
    importlib.resources.files("callplane.v1").joinpath("callplane_grpc_service_config.json").read_text()
)

TokenProvider = str | Callable[[], str | Awaitable[str]]
MetadataLike = Mapping[str, str] | Sequence[tuple[str, str]]
_KEEP: Any = object()


class CallplaneClient:
    """Async client for a Callplane server.

    ``CallplaneClient("127.0.0.1:50051")`` opens an insecure channel (or a secure one with
    `credentials`); pass `channel` to use your own (it is then not closed by `close()`). `token` is a
    string or a (sync or async) callable returning one, sent as ``authorization: Bearer <token>`` on
    every call; `metadata` is sent on every call too. `timeout` (seconds, None = no deadline) applies
    to each RPC (not to event streams, which stay open). Every failed RPC raises `CallplaneError`.
    A channel this client opens retries idempotent RPCs that fail with UNAVAILABLE (`SERVICE_CONFIG`);
    `options` given here win over it (e.g. ``[("grpc.enable_retries", 0)]`` turns retries off).
    `reconnect` says how event streams reconnect after a dropped connection (see `Reconnect`).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: TokenProvider | None = None,
        metadata: MetadataLike | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        options: Sequence[tuple[str, Any]] | None = None,
        reconnect: Reconnect | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        #: How event streams reconnect after a dropped connection.
        self.reconnect = reconnect or Reconnect()
        self._token = token
        self._metadata: tuple[tuple[str, str], ...] = _normalize_metadata(metadata)
        self._owns_channel = channel is None
        if channel is None:
            options = _with_service_config(options)
            if credentials is not None:
                channel = grpc.aio.secure_channel(target, credentials, options=options)
            else:
                channel = grpc.aio.insecure_channel(target, options=options)
        self.channel: grpc.aio.Channel = channel
        #: The generated stubs, for anything this client does not wrap.
        self.user_service = user_pb2_grpc.UserServiceStub(channel)
        self.call_service = call_service_pb2_grpc.CallServiceStub(channel)
        self.call_type_service = call_type_service_pb2_grpc.CallTypeServiceStub(channel)
        self.session_service = session_service_pb2_grpc.SessionServiceStub(channel)
        self.ring_service = ring_service_pb2_grpc.RingServiceStub(channel)
        self.call_data_service = call_data_service_pb2_grpc.CallDataServiceStub(channel)
        self.event_service = event_service_pb2_grpc.EventServiceStub(channel)
        self.webhook_service = webhook_service_pb2_grpc.WebhookServiceStub(channel)

    async def __aenter__(self) -> CallplaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owns_channel:
            await self.channel.close()

    def with_options(
        self,
        *,
        timeout: float | None = _KEEP,
        token: TokenProvider | None = _KEEP,
        metadata: MetadataLike | None = _KEEP,
    ) -> CallplaneClient:
        """A client sharing this channel with some options replaced (closing it leaves the channel open)."""
        clone = CallplaneClient(
            self.target,
            channel=self.channel,
            token=self._token if token is _KEEP else token,
            metadata=self._metadata if metadata is _KEEP else metadata,
            timeout=self.timeout if timeout is _KEEP else timeout,
            reconnect=self.reconnect,
        )
        return clone

    async def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        metadata = self._metadata
        if _propagate is not None:
            # The current OpenTelemetry context (W3C traceparent/tracestate, baggage: OTEL_PROPAGATORS),
            # so the server's span of this RPC joins the caller's trace; nothing outside a trace.
            carrier: dict[str, str] = {}
            _propagate.inject(carrier)
            if carrier:
                metadata = (*metadata, *carrier.items())
        token: TokenProvider | Awaitable[str] | None = self._token
        if callable(token):
            token = token()
            if inspect.isawaitable(token):
                token = await token
        if token:
            return (*metadata, ("authorization", f"Bearer {token}"))
        return metadata

    async def _rpc(self, method: Callable[..., Any], request: Any) -> Any:
        """Invoke one unary RPC with this client's deadline and metadata; errors → CallplaneError."""
        metadata = await self._call_metadata()
        try:
            return await method(request, timeout=self.timeout, metadata=metadata or None)
        except grpc.aio.AioRpcError as err:
            raise CallplaneError.from_rpc_error(err) from err

    # Users

    async def upsert_users(self, users: Iterable[Mapping[str, Any] | user_pb2.UserRequest]) -> list[UserInfo]:
        """Create or replace users given as `{"id", "name", "image", "role", "teams", "custom"}` dicts."""
        request = user_pb2.UpsertUsersRequest(users=to_user_requests(users))
        response = await self._rpc(self.user_service.UpsertUsers, request)
        return [UserInfo.from_proto(u) for u in response.users]

    async def upsert_user(self, user: Mapping[str, Any] | user_pb2.UserRequest) -> UserInfo:
        """Create or replace one user."""
        return (await self.upsert_users([user]))[0]

    async def update_users_partial(
        self, updates: Iterable[Mapping[str, Any] | user_pb2.UserPartialUpdate]
    ) -> list[UserInfo]:
        """Partially update users: `{"id", "set": {"custom.color": "red"}, "unset": ["image"]}`."""
        request = user_pb2.UpdateUsersPartialRequest(users=to_partial_updates(updates))
        response = await self._rpc(self.user_service.UpdateUsersPartial, request)
        return [UserInfo.from_proto(u) for u in response.users]

    async def query_users(
        self,
        *,
        filter_conditions: Mapping[str, Any] | None = None,
        sort: Iterable[SortLike] | SortLike | None = None,
        limit: int | None = None,
        next: str | None = None,
        prev: str | None = None,
    ) -> QueryPage[UserInfo]:
        """Find users (Mongo-style `filter_conditions`, `sort`, `limit`, `next`/`prev` cursors)."""
        request = user_pb2.QueryUsersRequest(
            filter_conditions=dict_to_struct(filter_conditions, path="filter_conditions"),
            sort=to_sort_params(sort),
            limit=limit or 0,
            next=next or "",
            prev=prev or "",
        )
        response = await self._rpc(self.user_service.QueryUsers, request)
        return QueryPage(
            [UserInfo.from_proto(u) for u in response.users],
            response.next or None,
            response.prev or None,
            response,
        )

    async def delete_users(self, user_ids: Iterable[str]) -> list[str]:
        """Delete users and their memberships; returns the deleted ids."""
        if isinstance(user_ids, str):
            user_ids = [user_ids]
        response = await self._rpc(
            self.user_service.DeleteUsers, user_pb2.DeleteUsersRequest(user_ids=list(user_ids))
        )
        return list(response.deleted_user_ids)

    # Call types

    async def create_call_type(
        self,
        name: str,
        *,
        settings: SettingsLike | None = None,
        grants: Mapping[str, Iterable[str]] | None = None,
        custom_indexes: Iterable[str] = (),
    ) -> CallTypeInfo:
        """Create a call type from nested settings dicts and `{"role": ["capability", ...]}` grants;
        `custom_indexes`: index specs for QueryCalls (`"region:string,priority:number:desc"`), built in
        the background (the result lists them BUILDING; get_call_type shows when they are READY)."""
        request = call_type_service_pb2.CreateCallTypeRequest(
            name=name,
            settings=to_settings(settings),
            grants=to_grants(grants),
            custom_indexes=list(custom_indexes),
        )
        response = await self._rpc(self.call_type_service.CreateCallType, request)
        return CallTypeInfo.from_proto(response.call_type)

    async def get_call_type(self, name: str) -> CallTypeInfo:
        """Get one call type."""
        request = call_type_service_pb2.GetCallTypeRequest(name=name)
        response = await self._rpc(self.call_type_service.GetCallType, request)
        return CallTypeInfo.from_proto(response.call_type)

    async def list_call_types(self) -> list[CallTypeInfo]:
        """Every call type, ordered by name."""
        request = call_type_service_pb2.ListCallTypesRequest()
        response = await self._rpc(self.call_type_service.ListCallTypes, request)
        return [CallTypeInfo.from_proto(t) for t in response.call_types]

    async def update_call_type(
        self,
        name: str,
        *,
        settings: SettingsLike | None = None,
        grants: Mapping[str, Iterable[str]] | None = None,
        custom_indexes: Iterable[str] | None = None,
    ) -> CallTypeInfo:
        """Merge `settings` into the type's settings; replace the grants of each role named in `grants`;
        replace the declared custom indexes with `custom_indexes` unless it is None (an empty list
        declares none: indexes nothing else declares are dropped)."""
        request = call_type_service_pb2.UpdateCallTypeRequest(
            name=name, settings=to_settings(settings), grants=to_grants(grants)
        )
        if custom_indexes is not None:
            request.custom_indexes.specs.extend(custom_indexes)
        response = await self._rpc(self.call_type_service.UpdateCallType, request)
        return CallTypeInfo.from_proto(response.call_type)

    async def delete_call_type(self, name: str) -> None:
        """Delete a call type (FAILED_PRECONDITION while calls of it exist)."""
        request = call_type_service_pb2.DeleteCallTypeRequest(name=name)
        await self._rpc(self.call_type_service.DeleteCallType, request)

    # Calls

    def call(self, call_type: str, call_id: str) -> Call:
        """A handle on the call `call_type:call_id` (no RPC until you use it)."""
        return Call(self, call_type, call_id)

    async def query_calls(
        self,
        *,
        filter_conditions: Mapping[str, Any] | None = None,
        sort: Iterable[SortLike] | SortLike | None = None,
        limit: int | None = None,
        next: str | None = None,
        prev: str | None = None,
        members_limit: int | None = None,
    ) -> QueryPage[CallState]:
        """Find calls; each item is a `CallState` (call + up to `members_limit` members)."""
        request = call_service_pb2.QueryCallsRequest(
            filter_conditions=dict_to_struct(filter_conditions, path="filter_conditions"),
            sort=to_sort_params(sort),
            limit=limit or 0,
            next=next or "",
            prev=prev or "",
            members_limit=members_limit or 0,
        )
        response = await self._rpc(self.call_service.QueryCalls, request)
        return QueryPage(
            [CallState.from_proto(c) for c in response.calls],
            response.next or None,
            response.prev or None,
            response,
        )

    # Event streams

    def watch_user(
        self,
        user_id: str,
        *,
        after_seq: int | None = None,
        progress_interval: float | None = None,
        include_progress: bool = True,
        reconnect: Reconnect | None = None,
    ) -> EventStream:
        """Follow the events addressed to `user_id` (incoming ring, notification, missed, accepted and
        rejected) in `user_seq` order: ``async for message in client.watch_user("alice")``. With
        `after_seq` it starts exactly after that user_seq (0: from the first retained); without, from
        now on (first a `ProgressMessage` saying where that is). With `progress_interval` (seconds) an
        idle stream also gets a `ProgressMessage` after each interval without a message; without, it
        receives nothing. Dropped connections are resumed transparently after the last user_seq seen."""

        def make_request(cursor: int | None) -> event_service_pb2.WatchUserRequest:
            request = event_service_pb2.WatchUserRequest(user_id=user_id)
            if cursor is not None:
                request.after_seq = cursor
            set_progress_interval(request, progress_interval)
            return request

        return EventStream(
            self,
            self.event_service.WatchUser,
            make_request,
            lambda event: event.user_seq,
            cursor=after_seq,
            reconnect=reconnect or self.reconnect,
            include_progress=include_progress,
        )

    def subscribe_events(
        self,
        *,
        call_types: Iterable[str] | None = None,
        call_cids: Iterable[str] | None = None,
        event_types: Iterable[str] | None = None,
        after_position: int | None = None,
        progress_interval: float | None = None,
        include_progress: bool = True,
        reconnect: Reconnect | None = None,
    ) -> EventStream:
        """The backend firehose over all calls, filtered by call type, cid and event type (each an
        AND-ed list; empty matches all), in global `position` order. With `after_position` it starts
        exactly after it (0: from the first retained); without, from now on. With `progress_interval`
        (seconds) a quiet stream gets a `ProgressMessage` after each interval without a message, which
        advances the resume point past filtered-out events (so a resume need not scan them again);
        dropped connections resume transparently."""
        types, cids, kinds = _as_list(call_types), _as_list(call_cids), _as_list(event_types)

        def make_request(cursor: int | None) -> event_service_pb2.SubscribeEventsRequest:
            request = event_service_pb2.SubscribeEventsRequest(
                call_types=types, call_cids=cids, event_types=kinds
            )
            if cursor is not None:
                request.after_position = cursor
            set_progress_interval(request, progress_interval)
            return request

        return EventStream(
            self,
            self.event_service.SubscribeEvents,
            make_request,
            lambda event: event.position,
            cursor=after_position,
            reconnect=reconnect or self.reconnect,
            include_progress=include_progress,
        )

    # Webhooks (server tokens and global admins only)

    async def create_webhook(
        self,
        url: str,
        *,
        event_types: Iterable[str] | None = None,
        call_types: Iterable[str] | None = None,
        description: str = "",
        enabled: bool = True,
    ) -> WebhookSecret:
        """Create an endpoint every matching event is POSTed to; returns it with its signing secret
        (`whsec_...`, shown only now). `event_types`: exact names (`call.ended`) or prefixes ending in `*`
        (`call.*`); `call_types`: only calls of these types; both empty: every event."""
        request = webhook_service_pb2.CreateWebhookRequest(
            url=url,
            event_types=_as_list(event_types),
            call_types=_as_list(call_types),
            description=description,
            disabled=not enabled,
        )
        response = await self._rpc(self.webhook_service.CreateWebhook, request)
        return WebhookSecret.from_proto(response)

    async def get_webhook(self, webhook_id: str) -> WebhookInfo:
        """One endpoint (never its secret)."""
        request = webhook_service_pb2.GetWebhookRequest(id=webhook_id)
        response = await self._rpc(self.webhook_service.GetWebhook, request)
        return WebhookInfo.from_proto(response.webhook)

    async def list_webhooks(self) -> list[WebhookInfo]:
        """Every endpoint, oldest first."""
        response = await self._rpc(
            self.webhook_service.ListWebhooks, webhook_service_pb2.ListWebhooksRequest()
        )
        return [WebhookInfo.from_proto(w) for w in response.webhooks]

    async def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str | None = None,
        event_types: Iterable[str] | None = None,
        call_types: Iterable[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> WebhookInfo:
        """Change the fields given (None keeps a field; an empty list removes a filter). Turning a
        FAILING endpoint off and on again does not resume it: see `resume_webhook`."""
        request = webhook_service_pb2.UpdateWebhookRequest(id=webhook_id)
        if url is not None:
            request.url = url
        if event_types is not None:
            request.event_types.SetInParent()
            request.event_types.values.extend(_as_list(event_types))
        if call_types is not None:
            request.call_types.SetInParent()
            request.call_types.values.extend(_as_list(call_types))
        if description is not None:
            request.description = description
        if enabled is not None:
            request.enabled = enabled
        response = await self._rpc(self.webhook_service.UpdateWebhook, request)
        return WebhookInfo.from_proto(response.webhook)

    async def delete_webhook(self, webhook_id: str) -> None:
        """Delete an endpoint and its delivery log (an attempt in flight may still arrive)."""
        request = webhook_service_pb2.DeleteWebhookRequest(id=webhook_id)
        await self._rpc(self.webhook_service.DeleteWebhook, request)

    async def rotate_webhook_secret(
        self, webhook_id: str, *, overlap: _dt.timedelta | float | None = None
    ) -> WebhookSecret:
        """Replace the signing secret; returns the new one (shown only now). The previous secret keeps
        signing too for `overlap` (a timedelta or seconds, 0 to 7 days; None: the server's 24 hours)."""
        request = webhook_service_pb2.RotateWebhookSecretRequest(
            id=webhook_id, overlap=to_duration(overlap, path="overlap")
        )
        response = await self._rpc(self.webhook_service.RotateWebhookSecret, request)
        return WebhookSecret.from_proto(response)

    async def resume_webhook(self, webhook_id: str) -> WebhookInfo:
        """Resume a FAILING endpoint: the event it gave up on is retried at once, with a new retry period."""
        request = webhook_service_pb2.ResumeWebhookRequest(id=webhook_id)
        response = await self._rpc(self.webhook_service.ResumeWebhook, request)
        return WebhookInfo.from_proto(response.webhook)

    async def list_webhook_deliveries(
        self,
        webhook_id: str,
        *,
        status: str | int | None = None,
        call_cid: str | None = None,
        event_type: str | None = None,
        limit: int | None = None,
        next: str | None = None,
    ) -> QueryPage[WebhookDeliveryInfo]:
        """An endpoint's delivery log, newest event first: filter by `status` ("pending", "succeeded",
        "failed"), `call_cid` and `event_type`; `limit` 1..100 (default 25); pass the page's `next` back
        for the following page (None on the last)."""
        request = webhook_service_pb2.ListWebhookDeliveriesRequest(
            webhook_id=webhook_id,
            status=to_delivery_status(status),
            call_cid=call_cid or "",
            event_type=event_type or "",
            limit=limit or 0,
            next=next or "",
        )
        response = await self._rpc(self.webhook_service.ListWebhookDeliveries, request)
        return QueryPage(
            [WebhookDeliveryInfo.from_proto(d) for d in response.deliveries],
            response.next or None,
            None,
            response,
        )

    async def redeliver_webhook(
        self,
        webhook_id: str,
        *,
        after_position: int | None = None,
        positions: Iterable[int] | None = None,
    ) -> WebhookRedelivery:
        """Send events again, one of: `after_position` (every matching event after that global position,
        still retained, in order again: the endpoint's cursor moves back to it), or `positions` (these
        events of the delivery log, at most 100, sent once more at once)."""
        if (after_position is None) == (positions is None):
            raise ValueError("redeliver_webhook: pass either after_position or positions")
        request = webhook_service_pb2.RedeliverWebhookRequest(id=webhook_id)
        if after_position is not None:
            request.after_position = after_position
        else:
            request.positions.SetInParent()
            request.positions.positions.extend(positions or ())
        response = await self._rpc(self.webhook_service.RedeliverWebhook, request)
        return WebhookRedelivery.from_proto(response)


def _with_service_config(options: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    """The channel options with the retry service config added, unless `options` sets those keys."""
    given = list(options or ())
    keys = {key for key, _ in given}
    defaults = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]
    return [option for option in defaults if option[0] not in keys] + given


def _as_list(values: Iterable[str] | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        return [values]
    return list(values)


def _normalize_metadata(metadata: MetadataLike | None) -> tuple[tuple[str, str], ...]:
    if not metadata:
        return ()
    pairs = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(key).lower(), value) for key, value in pairs)
