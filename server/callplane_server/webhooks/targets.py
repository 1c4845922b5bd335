"""Where webhooks may go: http(s) URLs of public hosts, unless the server allows private ones.

Checked twice: when an endpoint is created or changed (its host, and what it resolves to now), and at
every connection (a resolver that drops non-public addresses), so a name that later resolves to an
internal address (DNS rebinding) is refused too."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from aiohttp import ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult

from callplane_server.domain.webhooks import MAX_URL_LENGTH
from callplane_server.errors import ViolationCollector

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: not loopback, private, link-local, shared (CGNAT), multicast,
    reserved or unspecified (an IPv4-mapped IPv6 address is judged as the IPv4 one it carries)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def literal_address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback_name(host: str) -> bool:
    """`localhost` and its subdomains, which resolvers answer locally (RFC 6761)."""
    name = host.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost")


class PrivateTarget(Exception):
    """The target's host is (or resolves only to) a non-public address."""


def check_url(url: str, field: str, problems: ViolationCollector) -> str | None:
    """The URL's host if `url` is an absolute http(s) URL; else adds a violation and returns None."""
    if len(url) > MAX_URL_LENGTH:
        problems.add(field, f"at most {MAX_URL_LENGTH} characters, got {len(url)}")
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError as error:
        problems.add(field, f"not a valid URL: {error}")
        return None
    if parts.scheme not in ("http", "https"):
        problems.add(field, f"must be an http or https URL, got scheme {parts.scheme or '(none)'!r}")
        return None
    if not parts.hostname:
        problems.add(field, "must name a host")
        return None
    if parts.username or parts.password:
        problems.add(field, "must not carry credentials (user:password@): sign requests with the secret")
        return None
    return parts.hostname


async def refuse_private(host: str) -> None:
    """Raises PrivateTarget when `host` is a non-public address or resolves to one. A name that does
    not resolve now is let through: it is checked again at every connection."""
    literal = literal_address(host)
    if literal is not None:
        if not is_public(literal):
            raise PrivateTarget(f"{host} is not a public address")
        return
    if is_loopback_name(host):
        raise PrivateTarget(f"{host} is a loopback name")
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return
    addresses = [str(info[4][0]).split("%")[0] for info in found]
    private = [address for address in addresses if not is_public(ipaddress.ip_address(address))]
    if private:
        raise PrivateTarget(f"{host} resolves to non-public address {private[0]}")


class PublicOnlyResolver(AbstractResolver):
    """aiohttp resolver that returns only public addresses (a name with none fails to connect)."""

    def __init__(self) -> None:
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if is_loopback_name(host):
            raise OSError(f"refused: {host} is a loopback name (--webhook-allow-private allows it)")
        found = await self._inner.resolve(host, port, family)
        public = [result for result in found if is_public(ipaddress.ip_address(result["host"]))]
        if not public:
            raise OSError(
                f"refused: {host} resolves only to non-public addresses "
                f"({', '.join(str(r['host']) for r in found)}; --webhook-allow-private allows them)"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()


def resolver(allow_private: bool) -> Any:
    return ThreadedResolver() if allow_private else PublicOnlyResolver()
