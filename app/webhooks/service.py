"""Who may report on a connector's messages, and what the report says.

Twilio and Meta sign their callbacks with a secret of the connector's config. A callback that cannot be checked
(no PUBLIC_BASE_URL, an unknown connector, one of another type, one without the secret) is refused exactly like
a forged one, so that none of these can be told apart from outside. The signature is checked before anything
of the body is read as data; then the whole body is parsed before any receipt is recorded, so a malformed one
records nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import current_app
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import MultiDict

from app.attempts import RECEIPT_DELIVERED, RECEIPT_READ, RECEIPT_UNDELIVERED
from app.channels import CHANNELS
from app.connectors.models import Connector
from app.connectors.service import open_config
from app.crypto import SealError
from app.errors import InvalidError, ServiceError
from app.extensions import db
from app.messages import dispatch

log = logging.getLogger(__name__)

# The same words for every refusal: which check failed is for the log, not for the caller.
NOT_ACCEPTED = "Not accepted"
# Receipts carry a few hundred bytes; a body past this is not one.
MAX_BODY_BYTES = 64 * 1024
# The provider's words kept for an undelivered receipt (the dispatch side scrubs and masks them).
MAX_DETAIL = 300
# A provider's id of a message, as its sends return it (Twilio SM..., wamid.HBgL...).
PROVIDER_ID = re.compile(r"[\x21-\x7e]{1,128}")
STATUS = re.compile(r"[a-z_]{1,32}")

# What each provider's statuses say of a message; the ones left out (queued, sent, sending, accepted...) say
# nothing a receipt records.
TWILIO_RECEIPTS = {
    "delivered": RECEIPT_DELIVERED,
    "read": RECEIPT_READ,
    "undelivered": RECEIPT_UNDELIVERED,
    "failed": RECEIPT_UNDELIVERED,
}
WHATSAPP_RECEIPTS = {"delivered": RECEIPT_DELIVERED, "read": RECEIPT_READ, "failed": RECEIPT_UNDELIVERED}
# Twilio's status callbacks carry an ErrorCode and seldom its words: the usual ones of an undelivered SMS.
TWILIO_ERRORS = {
    "30001": "Queue overflow",
    "30002": "Account suspended",
    "30003": "Unreachable destination handset",
    "30004": "Message blocked",
    "30005": "Unknown destination handset",
    "30006": "Landline or unreachable carrier",
    "30007": "Message filtered by the carrier",
    "30008": "Unknown error",
    "30032": "Toll-free number has not been verified",
    "30034": "Message from an unregistered number",
}


class Refused(ServiceError):
    """A callback this service cannot or will not believe."""

    status_code = 403


@dataclass(frozen=True)
class Receipt:
    provider_message_id: str
    receipt: str
    detail: str | None


@dataclass(frozen=True)
class Receiver:
    """A connector that can check its provider's signatures, with the secret that signs them."""

    connector_id: uuid.UUID
    config: dict[str, Any]
    key: str
    callback_url: str


def _refuse(connector_id: uuid.UUID, why: str) -> Refused:
    log.info("receipt refused for connector %s: %s", connector_id, why, extra={"fields": {"reason": why}})
    return Refused(NOT_ACCEPTED)


def receiver(connector_id: uuid.UUID, route: str) -> Receiver:
    """The connector of `connector_id`, if it is of the type whose receipts arrive at `route` and can check
    their signatures; Refused otherwise. Any Host's connector: the provider knows no Hosts."""
    base_url = current_app.config.get("PUBLIC_BASE_URL")
    if not base_url:
        raise _refuse(connector_id, "PUBLIC_BASE_URL is not set")
    connector = db.session.get(Connector, connector_id)
    kind = CHANNELS.get(connector.type) if connector is not None else None
    if connector is None or kind is None or kind.receipts_route != route:
        raise _refuse(connector_id, f"no {route} connector of this id")
    try:
        config = open_config(connector)
    except SealError as exc:
        log.warning("connector %s: its config does not open: %s", connector_id, exc)
        raise _refuse(connector_id, "its config does not open") from None
    key = kind.receipt_key(config)
    callback_url = kind.callback_url(base_url, connector.id, config)
    if not key or not callback_url:
        raise _refuse(connector_id, "the connector has no secret to check signatures with")
    return Receiver(connector.id, config, key, callback_url)


def record(connector_id: uuid.UUID, receipts: list[Receipt]) -> int:
    """Record each receipt on the connector's attempt of that provider id; how many named one."""
    return sum(
        dispatch.record_receipt(connector_id, each.provider_message_id, each.receipt, each.detail) for each in receipts
    )


# --- Twilio -----------------------------------------------------------------------------------------------------


def twilio_callback(connector_id: uuid.UUID, signature: str | None, form: MultiDict[str, str]) -> int:
    """A Twilio status callback: checked against the connector's Auth Token over the URL it was given (built
    from PUBLIC_BASE_URL, never from the request's Host header) and the form's fields, then recorded."""
    found = receiver(connector_id, "twilio")
    if not signature or not RequestValidator(found.key).validate(found.callback_url, form, signature):
        raise _refuse(connector_id, "the X-Twilio-Signature does not match")
    receipt = parse_twilio(form)
    return record(found.connector_id, [receipt] if receipt else [])


def _field(form: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = form.get(name)
        if value:
            return value
    return None


def parse_twilio(form: Mapping[str, str]) -> Receipt | None:
    """What a status callback says of its message, or None when its status records nothing."""
    sid = _field(form, "MessageSid", "SmsSid")
    status = _field(form, "MessageStatus", "SmsStatus")
    errors: dict[str, list[str]] = {}
    if sid is None or not PROVIDER_ID.fullmatch(sid):
        errors["MessageSid"] = ["Required: the message's SID."]
    if status is None or not STATUS.fullmatch(status):
        errors["MessageStatus"] = ["Required: the message's status."]
    if errors:
        raise InvalidError("Not a Twilio status callback", errors={"form": errors})
    assert sid is not None and status is not None
    receipt = TWILIO_RECEIPTS.get(status)
    if receipt is None:
        return None
    detail = None
    if receipt == RECEIPT_UNDELIVERED:
        code = _field(form, "ErrorCode")
        code = code if code and code.isascii() and code.isdigit() and len(code) <= 10 else None
        words = _field(form, "ErrorMessage") or TWILIO_ERRORS.get(code or "")
        detail = f"Twilio: {status}"
        if code:
            detail += f", error {code}"
        if words:
            detail += f": {words}"
    return Receipt(sid, receipt, detail[:MAX_DETAIL] if detail else None)


# --- WhatsApp ---------------------------------------------------------------------------------------------------


def whatsapp_handshake(connector_id: uuid.UUID, mode: str | None, token: str | None, challenge: str | None) -> str:
    """Meta's subscription check: the challenge back when the verify token is the connector's."""
    found = receiver(connector_id, "whatsapp")
    expected = found.config.get("webhook_verify_token")
    if not expected:
        raise _refuse(connector_id, "the connector has no webhook_verify_token")
    given = (token or "").encode()
    if mode != "subscribe" or not hmac.compare_digest(given, str(expected).encode()):
        raise _refuse(connector_id, "not a subscription with the connector's verify token")
    if not challenge or len(challenge) > 256 or not challenge.isascii() or not challenge.isprintable():
        raise InvalidError("hub.challenge must be 1 to 256 printable ASCII characters")
    return challenge


def whatsapp_callback(connector_id: uuid.UUID, signature: str | None, body: bytes) -> int:
    """A Meta webhook call: its X-Hub-Signature-256 checked over the raw body with the app secret, then its
    statuses recorded."""
    found = receiver(connector_id, "whatsapp")
    expected = "sha256=" + hmac.new(found.key.encode(), body, hashlib.sha256).hexdigest()
    if not signature or not hmac.compare_digest(signature.strip().lower().encode(), expected.encode()):
        raise _refuse(connector_id, "the X-Hub-Signature-256 does not match")
    return record(found.connector_id, parse_whatsapp(body))


def _invalid(why: str) -> InvalidError:
    return InvalidError(f"Not a WhatsApp webhook payload: {why}")


def _list_of_objects(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise _invalid(f"{where} must be a list of objects")
    return value


def _text(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(f"{where} must be a string")
    return value


def parse_whatsapp(body: bytes) -> list[Receipt]:
    """The receipts of `entry[].changes[].value.statuses[]`; other changes (incoming messages) are ignored."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise _invalid("nested too deeply") from None
    except ValueError:  # not JSON, not UTF-8, or a number too long to read
        raise _invalid("not JSON") from None
    if not isinstance(payload, dict):
        raise _invalid("the body must be a JSON object")
    receipts: list[Receipt] = []
    for entry in _list_of_objects(payload.get("entry"), "entry"):
        for change in _list_of_objects(entry.get("changes"), "entry[].changes"):
            value = change.get("value")
            if value is None:
                continue
            if not isinstance(value, dict):
                raise _invalid("entry[].changes[].value must be an object")
            for status in _list_of_objects(value.get("statuses"), "statuses"):
                receipt = _whatsapp_status(status)
                if receipt is not None:
                    receipts.append(receipt)
    return receipts


def _whatsapp_status(status: dict[str, Any]) -> Receipt | None:
    wamid = _text(status.get("id"), "statuses[].id")
    name = _text(status.get("status"), "statuses[].status")
    if wamid is None or not PROVIDER_ID.fullmatch(wamid):
        raise _invalid("statuses[].id must be the message's id")
    if name is None or not STATUS.fullmatch(name):
        raise _invalid("statuses[].status must be a status")
    errors = _list_of_objects(status.get("errors"), "statuses[].errors")
    receipt = WHATSAPP_RECEIPTS.get(name)
    if receipt is None:
        return None
    detail = None
    if receipt == RECEIPT_UNDELIVERED:
        detail = "WhatsApp: failed"
        if errors:
            detail += _whatsapp_error(errors[0])
    return Receipt(wamid, receipt, detail[:MAX_DETAIL] if detail else None)


def _whatsapp_error(error: dict[str, Any]) -> str:
    code = error.get("code")
    if code is not None and (isinstance(code, bool) or not isinstance(code, int | str)):
        raise _invalid("statuses[].errors[].code must be a number")
    title = _text(error.get("title"), "statuses[].errors[].title")
    data = error.get("error_data")
    details = _text(data.get("details"), "statuses[].errors[].error_data.details") if isinstance(data, dict) else None
    words = title or _text(error.get("message"), "statuses[].errors[].message")
    text = f", error {str(code)[:16]}" if code not in (None, "") else ""
    if words:
        text += f": {words}"
    if details and details != words:
        text += f" ({details})"
    return text
