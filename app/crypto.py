"""Sealing and opening connector secrets.

AES-256-GCM with a key per Host, derived by HKDF-SHA256 from a master key and the Host id. The connector
id is bound in as associated data, so a ciphertext copied onto another row does not open. Each sealed
value is stored with the id of the master key that sealed it, so `MASTER_KEY` can rotate while
`OLD_MASTER_KEYS` still open older rows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
HKDF_SALT = b"bapba-connectors/v1"


class SealError(Exception):
    """A sealed value cannot be opened: unknown key id, or tampered data."""


def key_id(master_key: bytes) -> str:
    """A short public fingerprint of a master key (never the key itself)."""
    return hashlib.sha256(b"bapba-key-id:" + master_key).hexdigest()[:16]


@dataclass(frozen=True)
class Sealed:
    key_id: str
    ciphertext: bytes


class Keyring:
    def __init__(self, current: bytes, old: Iterable[bytes] = ()) -> None:
        self.current = current
        self.current_id = key_id(current)
        self._keys = {key_id(key): key for key in (*old, current)}

    def _host_key(self, master: bytes, host_id: uuid.UUID) -> AESGCM:
        derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=b"host:" + host_id.bytes).derive(
            master
        )
        return AESGCM(derived)

    def seal(self, host_id: uuid.UUID, row_id: uuid.UUID, value: dict[str, Any]) -> Sealed:
        """`value` sealed under the Host's key, bound to the row that holds it (a connector, a message)."""
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps(value, separators=(",", ":")).encode()
        ciphertext = self._host_key(self.current, host_id).encrypt(nonce, plaintext, row_id.bytes)
        return Sealed(self.current_id, nonce + ciphertext)

    def digest(self, host_id: uuid.UUID, data: bytes) -> str:
        """A keyed digest of `data` for the Host: compares requests without keeping (or exposing) their words."""
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=b"digest:" + host_id.bytes).derive(
            self.current
        )
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    def open(self, host_id: uuid.UUID, row_id: uuid.UUID, sealed: Sealed) -> dict[str, Any]:
        master = self._keys.get(sealed.key_id)
        if master is None:
            raise SealError(f"no master key with id {sealed.key_id}: add it to OLD_MASTER_KEYS")
        nonce, ciphertext = sealed.ciphertext[:NONCE_BYTES], sealed.ciphertext[NONCE_BYTES:]
        try:
            plaintext = self._host_key(master, host_id).decrypt(nonce, ciphertext, row_id.bytes)
        except InvalidTag:
            raise SealError("sealed value does not open: wrong key or tampered data") from None
        return json.loads(plaintext)
