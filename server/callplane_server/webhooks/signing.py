"""Signing secrets: made, sealed for storage, and used to sign requests the Standard Webhooks way."""

from __future__ import annotations

import base64
import os
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
_NONCE_BYTES = 12


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode()


class SecretBox:
    """Seals signing secrets for the database with a key derived from the server's API secret, which is
    not in the database: a dump alone does not reveal them. The webhook id is bound in (as associated
    data), so a sealed secret moved to another row does not open."""

    def __init__(self, api_secret: str) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"callplane webhook signing secrets"
        ).derive(api_secret.encode())
        self._aead = AESGCM(key)

    def seal(self, webhook_id: str, secret: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), webhook_id.encode())

    def open(self, webhook_id: str, sealed: bytes) -> str:
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, ciphertext, webhook_id.encode()).decode()
        except InvalidTag:
            raise SecretUnreadable(
                f"the signing secret of webhook {webhook_id} does not open with this server's API secret "
                "(was the API secret changed? give it a new one: RotateWebhookSecret with overlap 0)"
            ) from None


class SecretUnreadable(Exception):
    """A sealed secret that this server's key does not open."""


class Signer:
    """Signs with every secret that currently signs (two while a rotated one overlaps): receivers that
    know either accept the request."""

    def __init__(self, secrets: list[str]) -> None:
        self._signers = [Webhook(secret) for secret in secrets]

    def headers(self, message_id: str, at: datetime, body: str) -> dict[str, str]:
        signatures = " ".join(signer.sign(message_id, at, body) for signer in self._signers)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signatures,
            "content-type": "application/json",
        }
