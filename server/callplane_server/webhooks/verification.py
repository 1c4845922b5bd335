"""`callplane webhook verify`: checks a received webhook request the way a receiver does (with the
`standardwebhooks` library) and says what it found, for debugging a receiver."""

from __future__ import annotations

import hmac
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

_HEADER_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)\s*$")


def parse_headers(text: str) -> dict[str, str]:
    """Header names (lower-cased) to values, from a JSON object or `Name: value` lines (a request line
    such as `POST /hook HTTP/1.1` and anything else that is not a header is passed over)."""
    stripped = text.strip()
    if stripped.startswith("{"):
        loaded = json.loads(stripped)
        if not isinstance(loaded, dict):
            raise ValueError("the headers file holds JSON that is not an object")
        return {str(name).lower(): str(value) for name, value in loaded.items()}
    headers: dict[str, str] = {}
    for line in stripped.splitlines():
        found = _HEADER_LINE.match(line)
        if found:
            headers[found.group(1).lower()] = found.group(2)
    return headers


@dataclass
class Verification:
    """What the library said, and the details behind it."""

    verified: bool
    error: str
    message_id: str
    timestamp: datetime | None
    signatures: int
    matching: list[int] = field(default_factory=list)  # 1-based: which signatures this secret made
    event: dict[str, Any] | None = None

    def report(self, now: datetime) -> str:
        lines = [f"webhook-id:        {self.message_id or '(missing)'}"]
        if self.timestamp is None:
            lines.append("webhook-timestamp: (missing or not a number)")
        else:
            age = (now - self.timestamp).total_seconds()
            when = f"{-age:.0f} s from now" if age < 0 else f"{age:.0f} s ago"
            lines.append(
                f"webhook-timestamp: {int(self.timestamp.timestamp())} "
                f"({self.timestamp.isoformat().replace('+00:00', 'Z')}, {when})"
            )
        if self.matching:
            which = ", ".join(f"#{index}" for index in self.matching)
            lines.append(f"signatures:        {self.signatures}; this secret made {which}")
        else:
            lines.append(f"signatures:        {self.signatures}; none made with this secret")
        if self.event is not None:
            event = self.event
            lines.append(
                f"event:             {event.get('type', '?')} {event.get('callCid', '?')}"
                f" seq {event.get('seq', '?')} position {event.get('position', '?')}"
            )
        lines.append("verified:          yes" if self.verified else f"verified:          NO: {self.error}")
        return "\n".join(lines)


def verify_request(secret: str, headers: dict[str, str], body: bytes) -> Verification:
    """Verifies with `standardwebhooks` (signature and the library's 5-minute timestamp tolerance), and
    works out which of the request's signatures the secret made, so an old request still shows whether
    its signature was right. A malformed secret raises ValueError."""
    try:
        webhook = Webhook(secret)
    except Exception as malformed:  # binascii.Error, EmptyWebhookSecretError: both a malformed secret
        raise ValueError(f"not a webhook secret (whsec_<base64>): {malformed}") from None
    text = body.decode("utf-8", errors="replace")
    headers = {name.lower(): value for name, value in headers.items()}
    message_id = headers.get("webhook-id", "")
    signatures = [s for s in headers.get("webhook-signature", "").split(" ") if s]
    timestamp: datetime | None = None
    try:
        timestamp = datetime.fromtimestamp(int(headers.get("webhook-timestamp", "")), UTC)
    except (ValueError, OverflowError, OSError):
        timestamp = None
    matching: list[int] = []
    if timestamp is not None:
        expected = webhook.sign(message_id, timestamp, text)
        matching = [
            i for i, s in enumerate(signatures, 1) if hmac.compare_digest(s.encode(), expected.encode())
        ]
    event: dict[str, Any] | None = None
    try:
        verified, error = True, ""
        parsed = webhook.verify(text, headers)
        event = parsed if isinstance(parsed, dict) else None
    except WebhookVerificationError as failure:
        verified, error = False, str(failure)
    except ValueError as failure:  # the body is not JSON (json.JSONDecodeError), or a signature malformed
        verified, error = False, f"{type(failure).__name__}: {failure}"
    if event is None:
        try:
            loaded = json.loads(text)
            event = loaded if isinstance(loaded, dict) else None
        except ValueError:
            event = None
    return Verification(verified, error, message_id, timestamp, len(signatures), matching, event)
