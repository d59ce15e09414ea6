"""Who is calling: the Host behind a bearer token, or the will service."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request
from flask_jwt_extended import get_jwt, verify_jwt_in_request
from flask_smorest import abort

F = TypeVar("F", bound=Callable[..., Any])


# flask-jwt-extended decodes a token twice (unverified for its key callback, then verified), which cost more
# CPU than the list endpoint's query. A token that verified once stays good until its exp (no key rotation
# without a restart, no revocation list), so each app remembers recently verified ones by their header value.
VERIFIED_TOKENS_MAX = 2048


def _verify() -> dict[str, Any]:
    header = request.headers.get("Authorization", "")
    verified: dict[str, tuple[int, dict[str, Any]]] = current_app.extensions.setdefault("verified_tokens", {})
    remembered = verified.get(header)
    if remembered is not None and time.time() < remembered[0]:
        claims = remembered[1]
    else:
        verify_jwt_in_request()
        claims = get_jwt()
        # A token that never expires is not one we accept, whoever signed it.
        if "exp" not in claims:
            abort(401, message="Invalid token: missing exp claim")
        if len(verified) >= VERIFIED_TOKENS_MAX:
            verified.clear()  # crude but bounded; the next requests fill it again
        # PyJWT accepts any exp that int() takes (a float, a numeric string) and compares int(exp) to now.
        verified[header] = (int(claims["exp"]), claims)
    g.jwt_claims = claims  # the rate limiter keys by Host from these, without decoding the token again
    return claims


def host_required(view: F) -> F:
    """Require a Host's access token; the Host id is then `current_host_id()`."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        claims = _verify()
        if claims.get("role") == "service":  # a service acts on Hosts' behalf only where it is meant to
            abort(401, message="Invalid token: a service token is not a Host token")
        try:
            g.host_id = uuid.UUID(str(claims.get("sub", "")))
        except ValueError:
            abort(401, message="Invalid token: sub must be a Host uuid")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def service_required(view: F) -> F:
    """Require a token of an internal service (claim `role` = `service`)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        claims = _verify()
        if claims.get("role") != "service":
            abort(403, message="This endpoint is for internal services only")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def current_host_id() -> uuid.UUID:
    return g.host_id
