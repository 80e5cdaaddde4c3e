"""Bearer-token authentication of the predictor's routes, by scope.

Tokens come from settings (SecretStr lists, core/settings.py): ``admin_tokens``,
``predict_tokens``, ``feedback_tokens``. A request sends ``Authorization: Bearer <token>``.

Scopes and what they allow:

- ``admin``: promoting versions and any other model management. An admin token also has every
  other scope. With no admin token configured, admin routes answer 403 ("admin routes are
  disabled: set SLUICE_ADMIN_TOKENS") to everyone: the safe default, chosen over "allowed from
  loopback" because a reverse proxy on the same host makes every caller look local.
- ``predict``: inference (POST /predict) and reading what is served (GET /models).
- ``feedback``: POST /feedback (it steers the bandit).

``predict`` and ``feedback`` are optional: a scope without any token configured is open to
anyone (credentials are then not checked). Once it has tokens, a request without a bearer token
or with one no setting lists answers 401 with ``WWW-Authenticate: Bearer``, and a valid token
without the scope answers 403; bodies are the usual {"error": ..., "detail": ...}. /health,
/metrics and the docs stay open.

Token values are never logged or echoed: only SHA-256 digests are kept, compared in constant
time (hmac.compare_digest) with every configured token.

Protecting a route: add the scope's dependency, nothing else::

    @app.post("/v2/models/{name}/infer", dependencies=[require(Scope.PREDICT)])

``install(app, settings)`` (create_app calls it) puts the tokens on ``app.state.auth`` and
makes the OpenAPI document list 401 and 403 for every route that has a ``require`` dependency
of a scope with tokens (or admin); FastAPI itself lists the bearer security scheme, which is
taken off the routes that are open (their scopes have no tokens). tests/unit/test_serving_auth.py
enumerates app.routes, so a new route with neither a scope nor a place on its list of open
routes fails.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterator
from enum import StrEnum
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Security, params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.errors import UsageError
from core.settings import Settings
from serving.errors import ForbiddenError, UnauthenticatedError

log = logging.getLogger("sluice.serving.auth")


class Scope(StrEnum):
    ADMIN = "admin"
    PREDICT = "predict"
    FEEDBACK = "feedback"


# Scopes open to anyone while no token of theirs is configured; admin never is.
OPTIONAL_SCOPES = (Scope.PREDICT, Scope.FEEDBACK)
_SETTING = {
    Scope.ADMIN: "admin_tokens",
    Scope.PREDICT: "predict_tokens",
    Scope.FEEDBACK: "feedback_tokens",
}
_bearer = HTTPBearer(
    auto_error=False,
    description="An API token of the route's scope (admin, predict or feedback); see "
    "SLUICE_ADMIN_TOKENS, SLUICE_PREDICT_TOKENS, SLUICE_FEEDBACK_TOKENS.",
)
_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "no bearer token, or an unknown one (error: unauthenticated); the "
        "answer carries WWW-Authenticate: Bearer"
    },
    403: {
        "description": "the token lacks the route's scope, or (admin routes) no admin token "
        "is configured (error: forbidden)"
    },
}


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """The configured tokens (as digests) and the scopes each grants."""

    def __init__(self, settings: Settings) -> None:
        grants: dict[bytes, set[Scope]] = {}
        for scope, name in _SETTING.items():
            for secret in getattr(settings, name):
                grants.setdefault(_digest(secret.get_secret_value()), set()).add(scope)
        for scopes in grants.values():
            if Scope.ADMIN in scopes:
                scopes.update(Scope)
        self._grants = [(digest, frozenset(scopes)) for digest, scopes in grants.items()]
        self.configured = frozenset(
            scope for scope, name in _SETTING.items() if getattr(settings, name)
        )

    @property
    def open_scopes(self) -> list[Scope]:
        """Optional scopes without tokens: anyone may call their routes."""
        return [scope for scope in OPTIONAL_SCOPES if scope not in self.configured]

    def scopes_of(self, token: str) -> frozenset[Scope] | None:
        """The scopes a token grants; None for a token no setting lists."""
        digest = _digest(token)
        found: frozenset[Scope] | None = None
        for known, scopes in self._grants:  # no early exit: the time does not tell which
            if hmac.compare_digest(digest, known):
                found = scopes
        return found

    def check(self, scope: Scope, token: str | None) -> None:
        """Pass, or raise UnauthenticatedError (401) or ForbiddenError (403)."""
        if scope not in self.configured:
            if scope is Scope.ADMIN:
                raise ForbiddenError(
                    "admin routes are disabled: set SLUICE_ADMIN_TOKENS and send "
                    "Authorization: Bearer <token>"
                )
            return
        if not token:
            raise UnauthenticatedError(
                f"this route needs a bearer token with scope {scope} "
                "(Authorization: Bearer <token>)"
            )
        scopes = self.scopes_of(token)
        if scopes is None:
            raise UnauthenticatedError("the bearer token is not valid")
        if scope not in scopes:
            raise ForbiddenError(f"the bearer token does not have scope {scope}")


_SCOPE_OF: dict[Callable[..., Any], Scope] = {}


@cache
def require(scope: Scope) -> params.Depends:
    """The dependency that lets a request through only with the scope (see the docstring)."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    ) -> None:
        authenticator: Authenticator = request.app.state.auth
        authenticator.check(scope, credentials.credentials if credentials else None)

    check.__name__ = f"require_{scope}"
    _SCOPE_OF[check] = scope
    depends: params.Depends = Depends(check)
    return depends


def _scopes(dependant: Dependant) -> Iterator[Scope]:
    for dependency in dependant.dependencies:
        if dependency.call in _SCOPE_OF:
            yield _SCOPE_OF[dependency.call]
        yield from _scopes(dependency)


def route_scopes(route: APIRoute) -> set[Scope]:
    """The scopes a route requires (empty: open to anyone)."""
    return set(_scopes(route.dependant))


def install(app: FastAPI, settings: Settings) -> None:
    """Tokens on app.state.auth; 401/403 in the OpenAPI of every route that requires a scope
    (added when the document is first built, so routes added after this call count too)."""
    authenticator = app.state.auth = Authenticator(settings)
    build_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return build_openapi()
        open_routes = []
        open_scopes = set(authenticator.open_scopes)
        for route in app.routes:
            if not isinstance(route, APIRoute) or not (scopes := route_scopes(route)):
                continue
            if scopes <= open_scopes:
                open_routes.append(route)
                continue
            for status, response in _RESPONSES.items():
                route.responses.setdefault(status, response)
        spec = build_openapi()
        # A route whose scopes have no tokens configured is open: credentials are not checked,
        # so the document lists no security for it (schemathesis' ignored_auth check found
        # /predict documented as bearer-only while it answered without a token).
        for route in open_routes:
            for method in route.methods or ():
                spec["paths"].get(route.path_format, {}).get(method.lower(), {}).pop(
                    "security", None
                )
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings, allow_unauthenticated: bool) -> None:
    """Refuse (UsageError) to listen beyond loopback while a scope is open to anyone, unless
    allowed explicitly; then log a warning naming what is open."""
    if is_loopback(host):
        return
    open_scopes = [str(s) for s in Authenticator(settings).open_scopes]
    if not open_scopes:
        return
    settings_names = " and ".join(f"SLUICE_{_SETTING[Scope(s)].upper()}" for s in open_scopes)
    if not allow_unauthenticated:
        raise UsageError(
            f"refusing to listen on {host} with {' and '.join(open_scopes)} open to anyone: "
            f"set {settings_names}, or pass --allow-unauthenticated"
        )
    log.warning(
        "listening beyond loopback without tokens",
        extra={"host": host, "open_scopes": open_scopes},
    )
