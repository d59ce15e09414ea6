"""Marshmallow fields shared by the resources and the connector types."""

from __future__ import annotations

import unicodedata
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email
from marshmallow import ValidationError, fields, validate

TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
NAME_MAX = 100
# Invisible or layout-changing characters: a name that differs only by them looks like another (U+200B,
# U+00AD, U+202E, U+2028), so they are refused rather than stored.
REFUSED_IN_NAMES = {"Cc", "Cf", "Zl", "Zp"}
# The same rule for the docs (JSON Schema has no Unicode categories): the common members of those categories.
NAME_PATTERN = (
    r"^[^\x00-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]*"
    r"[^\s\x00-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]"
    r"[^\x00-\x1f\x7f-\x9f\xad\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]*$"
)


# What ends a line or a header: the C0 and C1 controls (CR, LF, NUL, tab...) and the line and paragraph
# separators. Refused in one-line values (a subject, an address) at the API: a provider would fail on them later,
# after the request was accepted ("Header values may not contain linefeed"), or a header would break in two.
LINE_BREAKING = {"Cc", "Zl", "Zp"}
ONE_LINE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*$"  # the rule for the docs
NO_NUL_PATTERN = r"^[^\x00]*$"


def one_line(value: str) -> None:
    """A marshmallow validator: no control character or line separator."""
    if any(unicodedata.category(char) in LINE_BREAKING for char in value):
        raise ValidationError("Must not contain control characters (such as CR, LF or NUL) or line separators.")


def no_nul(value: str) -> None:
    """A marshmallow validator for text that may span lines: no NUL, which no database text column or provider
    takes."""
    if "\x00" in value:
        raise ValidationError("Must not contain NUL characters.")


class FullMatch(validate.Regexp):
    """Regexp on the whole value: `re.match` with `$` would let a trailing newline through."""

    def __call__(self, value: str) -> str:
        if not isinstance(value, str) or self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


class StrictInteger(fields.Integer):
    """An integer in the JSON sense: no strings, floats or booleans."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError("Must be an integer.")
        return value


class Name(fields.String):
    """A display name: trimmed, NFC-normalised, 1-100 characters, no control or format characters.

    Names stay case-sensitive: "SMTP" and "smtp" are two names.
    """

    def __init__(self, **kwargs: Any) -> None:
        metadata = {"minLength": 1, "maxLength": NAME_MAX, "pattern": NAME_PATTERN, **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = unicodedata.normalize("NFC", super()._deserialize(value, attr, data, **kwargs).strip())
        if not 1 <= len(text) <= NAME_MAX:
            raise ValidationError(f"Must be 1 to {NAME_MAX} characters after trimming.")
        if any(unicodedata.category(char) in REFUSED_IN_NAMES for char in text):
            raise ValidationError("Must not contain control, format or line-separator characters.")
        return text


class UtcTimestamp(fields.Field):
    def __init__(self, **kwargs: Any) -> None:
        metadata = {"type": "string", "format": "date-time", **kwargs.pop("metadata", {})}
        super().__init__(metadata=metadata, **kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else value.strftime(TIMESTAMP_FORMAT)


def e164(value: Any) -> str:
    """The number in E.164 form, or ValidationError."""
    if not isinstance(value, str) or not value.startswith("+"):
        raise ValidationError("Must be an E.164 phone number such as +14155550123.")
    one_line(value)  # phonenumbers would drop a trailing CR, LF, tab or NUL and take the number
    try:
        number = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValidationError("Must be an E.164 phone number such as +14155550123.") from None
    if not phonenumbers.is_valid_number(number):
        raise ValidationError("Not a valid phone number.")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def email_address(value: Any) -> str:
    """The normalized address, or ValidationError."""
    if not isinstance(value, str) or len(value) > 320:
        raise ValidationError("Must be a valid email address.")
    try:
        return validate_email(value, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValidationError(f"Must be a valid email address: {exc}") from None


class E164(fields.String):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"format": "e164", "example": "+14155550123", **kwargs.pop("metadata", {})}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return e164(super()._deserialize(value, attr, data, **kwargs))


class EmailAddress(fields.String):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(metadata={"format": "email", **kwargs.pop("metadata", {})}, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return email_address(super()._deserialize(value, attr, data, **kwargs))


PRINTABLE_ASCII = FullMatch(r"[\x20-\x7e]*", error="Must be printable ASCII characters.")


def credential(max_length: int = 4096, required: bool = True) -> fields.String:
    """A write-only credential. Providers carry credentials in ASCII-only places (HTTP headers, SMTP AUTH)."""
    return fields.String(
        required=required,
        load_only=True,
        validate=[validate.Length(1, max_length, error="Required: must be 1 to {max} characters."), PRINTABLE_ASCII],
    )
