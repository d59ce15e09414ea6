"""Who is calling: the Host behind a bearer token, or another BAPBA service."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import g
from flask_jwt_extended import get_jwt, verify_jwt_in_request
from flask_smorest import abort

F = TypeVar("F", bound=Callable[..., Any])


def _verify() -> dict[str, Any]:
    verify_jwt_in_request()
    claims = get_jwt()
    # A token that never expires is not one we accept, whoever signed it.
    if "exp" not in claims:
        abort(401, message="Invalid token: missing exp claim")
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
    """Require a token of an internal service (claim `role` = `service`); a Host token gets 403."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        claims = _verify()
        if claims.get("role") != "service":
            abort(403, message="This endpoint is for internal services only")
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def current_host_id() -> uuid.UUID:
    return g.host_id
