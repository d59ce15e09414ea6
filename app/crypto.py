"""Sealing and opening connector secrets, message bodies and Hosts' digest keys; idempotency digests.

AES-256-GCM with a key per Host, derived by HKDF-SHA256 from a master key and the Host id. The id of the row
that holds the value (a connector, a message, the Host) is bound in as associated data, so a ciphertext copied
onto another row does not open. Each sealed value is stored with the id of the master key that sealed it, so
`MASTER_KEY` can rotate while `OLD_MASTER_KEYS` still open older rows, until they are re-sealed.

Idempotency digests are HMAC-SHA256 under the Host's own digest key: random, and sealed like a config, so a
rotation re-seals it and never changes it. Digests made before Hosts had one were keyed by a derivation of the
master key then current; they are recognised only while that master key is in the keyring.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE_BYTES = 12
DIGEST_KEY_BYTES = 32
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
        """`value` sealed under the Host's key, bound to the row that holds it (a connector, a message, the Host)."""
        nonce = os.urandom(NONCE_BYTES)
        plaintext = json.dumps(value, separators=(",", ":")).encode()
        ciphertext = self._host_key(self.current, host_id).encrypt(nonce, plaintext, row_id.bytes)
        return Sealed(self.current_id, nonce + ciphertext)

    def seal_digest_key(self, host_id: uuid.UUID, digest_key: bytes) -> Sealed:
        """The Host's digest key sealed like a config, bound to the Host's own row."""
        return self.seal(host_id, host_id, {"digest_key": digest_key.hex()})

    def open_digest_key(self, host_id: uuid.UUID, sealed: Sealed) -> bytes:
        return bytes.fromhex(self.open(host_id, host_id, sealed)["digest_key"])

    def request_digest(self, host_id: uuid.UUID, digest_key: bytes, data: bytes) -> RequestDigest:
        """A keyed digest of `data` under the Host's digest key: compares requests without keeping (or
        exposing) their words."""
        return RequestDigest(hmac.new(digest_key, data, hashlib.sha256).hexdigest(), self, host_id, data)

    def legacy_digests(self, host_id: uuid.UUID, data: bytes) -> list[str]:
        """The digests of `data` as made before Hosts had a digest key (derived from the master key then
        current), under every master key of the keyring."""
        info = b"digest:" + host_id.bytes
        derived = (
            HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=info).derive(master)
            for master in self._keys.values()
        )
        return [hmac.new(key, data, hashlib.sha256).hexdigest() for key in derived]

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


def new_digest_key() -> bytes:
    return os.urandom(DIGEST_KEY_BYTES)


@dataclass(frozen=True)
class RequestDigest:
    """A request's digest (64 hex characters, what a new message keeps), and whether a kept one is of the
    same request."""

    value: str
    keyring: Keyring = field(repr=False)
    host_id: uuid.UUID = field(repr=False)
    data: bytes = field(repr=False)  # the request's words: never in a log line

    def matches(self, kept: str) -> bool:
        if hmac.compare_digest(kept, self.value):
            return True
        # Made before the Host had a digest key: recognised only while its master key is in the keyring.
        return any(hmac.compare_digest(kept, legacy) for legacy in self.keyring.legacy_digests(self.host_id, self.data))
