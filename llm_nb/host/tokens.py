"""Session tokens: short-lived, signed credentials scoped to named models and deployments.

``POST /api/token`` (host key only) answers a JWT (HS256, PyJWT) that opens the
routes of the names in its scope, and nothing else: no admin route, no other
model. The signing secret is random per host run and lives only in this
process, so a token proves nothing once its host has stopped, and the host
key itself never has to leave the connection file.

A deployment's worker gets a credential of its own (``kind: deployment``):
it has no expiry but dies with the deployment, since the verifier asks the
live deployments whether that instance still runs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import jwt
from aiohttp import web

from ..errors import InvalidRequest, PermissionDenied
from .http import OWNER_SEP, PRINCIPAL, Principal, json_response, read_json
from .schemas import TokenRequest, parse

DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 24 * 3600.0
MAX_SCOPE = 64
AUDIENCE = "llm-nb-host"
ALGORITHM = "HS256"
#: ``"*"`` in a scope: every model and deployment (still no admin route).
EVERYTHING = "*"

routes = web.RouteTableDef()


class TokenIssuer:
    def __init__(self, secret: bytes | None = None, deployment_alive: Callable[[str], bool] | None = None):
        self._secret = secret or secrets.token_bytes(32)
        #: ``instance id -> still deployed?``: a deployment's credential stands as long as its version runs.
        self.deployment_alive: Callable[[str], bool] = deployment_alive or (lambda instance: False)

    def issue(self, scope: list[str], ttl: float = DEFAULT_TTL_S) -> dict:
        """A session token for ``scope``; returns the token, its expiry and its scope."""
        scope = _check_scope(scope)
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL_S:
            raise InvalidRequest(f"ttl must be between 1 and {MAX_TTL_S:.0f} seconds, not {ttl!r}")
        now = time.time()
        claims = {
            "aud": AUDIENCE,
            "kind": "session",
            "scope": scope,
            "iat": int(now),
            "exp": int(now + ttl),
            "jti": secrets.token_hex(8),
        }
        return {
            "token": jwt.encode(claims, self._secret, algorithm=ALGORITHM),
            "token_type": "Bearer",
            "expires_at": claims["exp"],
            "expires_in": int(ttl),
            "scope": scope,
        }

    def issue_deployment(self, instance: str, scope: list[str] | None) -> str:
        """The credential a deployment's worker calls the host with (``use_model``)."""
        claims = {"aud": AUDIENCE, "kind": "deployment", "jti": instance, "iat": int(time.time())}
        if scope is not None:
            claims["scope"] = _check_scope(scope)
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, credential: str) -> Principal | None:
        """The principal a token stands for, or None when it is forged, expired or revoked."""
        if credential.count(".") != 2:  # not a JWT: spare the decoder
            return None
        try:
            claims = jwt.decode(
                credential,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                options={"require": ["aud", "iat", "jti"]},
            )
        except jwt.InvalidTokenError:
            return None
        scope = claims.get("scope")
        names = None if scope is None or EVERYTHING in scope else frozenset(scope)
        if claims.get("kind") == "session":
            if "exp" not in claims:  # a session token without expiry was not made here
                return None
            if scope is None:
                return None
            return Principal("token", names, subject=claims["jti"])
        if claims.get("kind") == "deployment" and self.deployment_alive(claims["jti"]):
            return Principal("deployment", names, subject=claims["jti"])
        return None


def _check_scope(scope) -> list[str]:
    if isinstance(scope, str):
        scope = [scope]
    if not isinstance(scope, list) or not scope or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in scope):
        raise InvalidRequest(
            'scope must name the models or deployments the token opens, e.g. {"scope": ["my-deployment"]} '
            '(or ["*"] for all of them)'
        )
    if len(scope) > MAX_SCOPE:
        raise InvalidRequest(f"a token can name at most {MAX_SCOPE} models or deployments")
    return sorted(set(scope))


@routes.post("/api/token")
async def token(request: web.Request) -> web.Response:
    """Mint a session token. Only the host key may: a token cannot mint more tokens."""
    principal = request[PRINCIPAL]
    principal.require_admin()
    body = parse(TokenRequest, await read_json(request))
    scope = body.scope
    if principal.user is not None:  # on a JupyterHub: the models, and the user's own deployments
        scope = _user_scope(request, _check_scope(scope))
    issuer: TokenIssuer = request.app["tokens"]
    return json_response(issuer.issue(scope, body.ttl))


def _user_scope(request: web.Request, scope: list[str]) -> list[str]:
    principal = request[PRINCIPAL]
    if "*" in scope and not principal.is_operator:
        raise PermissionDenied(
            'a token for "*" would open every user\'s deployments; name your models and deployments instead'
        )
    deployments = request.app["deployments"]
    named = []
    for name in scope:
        own = principal.deployment_name(name)
        if own in deployments.deployments or own in deployments.pending or OWNER_SEP in name:
            principal.require_deployment(own)
            named.append(own)
        else:
            named.append(name)  # a model: shared by every user
    return sorted(set(named))
