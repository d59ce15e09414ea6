"""One scrub for every secret, in every form a provider or a library might echo it.

Providers answer with free text that can quote what they were sent: the password, the token, or the HTTP
`Authorization: Basic` header (base64 of `user:secret`). Every message built from such text, and every log
line written while a job holds secrets, passes through `scrub`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
# A shorter secret cannot be cut out of a text without cutting ordinary words too (a password "er" would
# turn "server" into "s[redacted]v[redacted]" and so hint at itself): such a text is dropped instead.
MIN_SCRUBBABLE = 8

# Whatever logged it, never let a bot token or a bearer credential through.
PATTERNS = (
    re.compile(r"bot[0-9]{3,20}:[A-Za-z0-9_-]{20,}"),
    re.compile(r"[0-9]{3,20}:[A-Za-z0-9_-]{30,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=_-]{8,}"),
)

_in_scope: ContextVar[tuple[str, ...]] = ContextVar("secrets_in_scope", default=())


def _base64_cores(raw: bytes) -> Iterator[str]:
    """The part of `raw`'s base64 that is the same wherever `raw` sits in a longer encoded text.

    Base64 packs 3 bytes into 4 characters, so a secret inside `user:secret` encodes differently at each of
    the three byte offsets; the characters made only of the secret's own bits are found at any offset.
    """
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            encoded = encode(b"\0" * offset + raw).decode()
            start, end = -(-8 * offset // 6), (8 * offset + 8 * len(raw)) // 6
            yield encoded[start:end]


def forms(secret: str) -> set[str]:
    """Every form of `secret` to look for: as is, URL-encoded, and base64 at every alignment."""
    found = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret)}
    # As quoted inside JSON or HTML by a provider that echoes its request.
    found.update({json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], html.escape(secret)})
    found.update(_base64_cores(secret.encode()))
    return {form for form in found if form}


def scrubbable(secrets: Iterable[str]) -> bool:
    return all(len(secret) >= MIN_SCRUBBABLE for secret in secrets if secret)


def scrub(text: str, secrets: Iterable[str]) -> str | None:
    """`text` without any form of any secret, or None when a secret is too short to cut out cleanly."""
    secrets = [secret for secret in secrets if secret]
    if not scrubbable(secrets):
        return None
    # Longest first, so that a form containing another is removed whole.
    for form in sorted({form for secret in secrets for form in forms(secret)}, key=len, reverse=True):
        # Case-insensitive: some client libraries re-case the provider's text.
        text = re.sub(re.escape(form), REDACTED, text, flags=re.IGNORECASE)
    return text


def redact(text: str) -> str:
    """For log lines: the secrets of the job in progress, and anything that looks like a token."""
    secrets = _in_scope.get()
    if secrets:
        text = scrub(text, secrets) or REDACTED
    for pattern in PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + REDACTED, text)
    return text


@contextmanager
def secrets_in_scope(secrets: Iterable[str]) -> Iterator[None]:
    """Every log line written inside the block is scrubbed of these secrets."""
    token = _in_scope.set(tuple(secret for secret in secrets if secret))
    try:
        yield
    finally:
        _in_scope.reset(token)
