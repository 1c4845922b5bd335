"""HS256 tokens signed with the server's API secret (PyJWT).

A server token (`{"server": true}`) may do everything. A user token (`user_id`, `iat`, `exp`, optional
`call_cids`) acts as that user, limited to those calls when `call_cids` is given."""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jwt

from callplane_server.errors import Unauthenticated

ALGORITHM = "HS256"
SECRET_FILE_NAME = "api_secret"
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """Who is calling: the server (a backend) or one user."""

    user_id: str | None = None
    call_cids: frozenset[str] | None = None

    @property
    def is_server(self) -> bool:
        return self.user_id is None


SERVER = Principal()


def create_token(
    secret: str,
    *,
    user_id: str | None = None,
    ttl: timedelta | None = None,
    call_cids: list[str] | None = None,
    now: datetime | None = None,
) -> str:
    """A server token when user_id is None, else a user token (which needs a ttl)."""
    issued = now or datetime.now(UTC)
    claims: dict[str, object] = {"iat": int(issued.timestamp())}
    if user_id is None:
        claims["server"] = True
    else:
        if ttl is None:
            raise ValueError("user tokens need a ttl")
        claims["user_id"] = user_id
    if ttl is not None:
        claims["exp"] = int((issued + ttl).timestamp())
    if call_cids:
        claims["call_cids"] = list(call_cids)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def _unauthenticated(reason: str, message: str) -> Unauthenticated:
    return Unauthenticated(message, reason=reason)


def verify_token(secret: str, token: str, *, leeway_seconds: float = 5.0) -> Principal:
    """The principal a token stands for, or Unauthenticated with the reason it was refused."""
    return _verify(secret, token, leeway_seconds)[0]


def _verify(secret: str, token: str, leeway_seconds: float) -> tuple[Principal, dict[str, object]]:
    """verify_token, also handing back the verified claims."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.DecodeError:
        raise _unauthenticated("TOKEN_MALFORMED", "the bearer token is not a JWT") from None
    if header.get("alg") != ALGORITHM:
        raise _unauthenticated(
            "TOKEN_ALGORITHM_NOT_ALLOWED",
            f"tokens must be signed with {ALGORITHM}, not {header.get('alg')!r}",
        )
    try:
        claims = jwt.decode(
            token, secret, algorithms=[ALGORITHM], leeway=leeway_seconds, options={"require": ["iat"]}
        )
    except jwt.ExpiredSignatureError:
        raise _unauthenticated("TOKEN_EXPIRED", "the token has expired") from None
    except jwt.InvalidSignatureError:
        raise _unauthenticated(
            "TOKEN_SIGNATURE_INVALID", "the token is not signed with this server's secret"
        ) from None
    except jwt.MissingRequiredClaimError as error:
        raise _unauthenticated("TOKEN_CLAIMS_INVALID", f"the token lacks the {error.claim!r} claim") from None
    except jwt.InvalidTokenError as error:
        raise _unauthenticated("TOKEN_MALFORMED", f"the token is invalid: {error}") from None
    if claims.get("server") is True and "user_id" not in claims:
        return SERVER, claims
    user_id = claims.get("user_id")
    if not isinstance(user_id, str) or not user_id:
        raise _unauthenticated("TOKEN_CLAIMS_INVALID", "a user token needs a user_id claim")
    if "exp" not in claims:
        raise _unauthenticated("TOKEN_CLAIMS_INVALID", "a user token needs an exp claim")
    call_cids = claims.get("call_cids")
    if call_cids is not None and not (
        isinstance(call_cids, list) and all(isinstance(c, str) for c in call_cids)
    ):
        raise _unauthenticated("TOKEN_CLAIMS_INVALID", "call_cids must be a list of cids")
    return Principal(
        user_id=user_id, call_cids=frozenset(call_cids) if call_cids is not None else None
    ), claims


class TokenVerifier:
    """verify_token with a bounded cache of tokens already accepted: clients send the same token on every
    RPC, and checking its HMAC and claims each time is most of what a cheap read costs. A cached token
    is still refused once its `exp` (plus leeway) passes; refusals are never cached."""

    def __init__(self, secret: str, *, leeway_seconds: float = 5.0, capacity: int = 4096) -> None:
        self._secret = secret
        self._leeway = leeway_seconds
        self._capacity = capacity
        self._accepted: dict[str, tuple[Principal, float]] = {}

    def verify(self, token: str) -> Principal:
        cached = self._accepted.get(token)
        if cached is not None:
            principal, valid_until = cached
            if time.time() < valid_until:
                return principal
            del self._accepted[token]
        principal, claims = _verify(self._secret, token, self._leeway)
        if len(self._accepted) >= self._capacity:
            # Dicts keep insertion order: drop the oldest entry.
            del self._accepted[next(iter(self._accepted))]
        # A server token may have no `exp`: it stays valid.
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else math.inf
        self._accepted[token] = (principal, expires_at + self._leeway)
        return principal


def load_or_create_secret(data_dir: Path) -> str:
    """The development secret kept in the data folder, created on first use (owner-only file)."""
    path = data_dir / SECRET_FILE_NAME
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value + "\n")
    return value


def parse_bearer(value: str | None) -> str:
    if not value:
        raise _unauthenticated("TOKEN_MISSING", "send 'authorization: Bearer <token>' metadata")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthenticated("TOKEN_MALFORMED", "the authorization metadata must be 'Bearer <token>'")
    return token.strip()
