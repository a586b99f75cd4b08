"""The token endpoints: create, list, rotate and revoke the access tokens of the store, and
GET /tokens/self, what the calling token may do (see access.py for how a request is judged).

All but /tokens/self are admin only. A server without KV_AUTH_TOKEN is open to everyone, so
that no token could limit anything: it refuses them all with 403. A secret is answered once,
at creation or rotation; the store keeps only its SHA-256 (access.hash_secret), and neither
is ever listed or logged. Creating, rotating and revoking a token are audit events, logged
with the token's name and the name of the token that did it.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import orjson
import structlog
from aiohttp import web

from . import rules
from .access import Grant, grant_of, hash_secret, new_secret, require
from .errors import JSON_HEADERS, ApiError
from .models import TOKEN_NAME_PATTERN, RotateRequest, TokenRequest, TokenRuleRequest
from .settings import Settings
from .state import CLOCK_KEY, METRICS_KEY, SETTINGS_KEY, STORE_KEY
from .store.base import Token, TokenExists, TokenNotFound, TokenRule
from .validation import parse_body

audit_log = structlog.get_logger("kv.audit")

_NAME = re.compile(TOKEN_NAME_PATTERN)
# What an open server's requests may do, as /tokens/self says it: everything.
_OPEN = {"name": None, "rules": [{"prefix": "", "access": "readwrite"}], "admin": True}


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), headers=JSON_HEADERS)


def _rules(token_rules: tuple[TokenRule, ...]) -> list[dict[str, str]]:
    return [{"prefix": rule.prefix, "access": rule.access} for rule in token_rules]


def _time(milliseconds: Optional[int]) -> Optional[str]:
    return None if milliseconds is None else rules.rfc3339(milliseconds)


def _with_secret(token: Token, secret: str) -> dict[str, Any]:
    return {
        "name": token.name,
        "secret": secret,
        "rules": _rules(token.rules),
        "admin": token.admin,
        "created_at": rules.rfc3339(token.created_at),
        "expires_at": _time(token.expires_at),
    }


def _now_ms(request: web.Request) -> int:
    return round(request.app[CLOCK_KEY]() * 1000)


def _admin(request: web.Request) -> Optional[Grant]:
    """The acting admin's grant; 403 for any other, and on a server without KV_AUTH_TOKEN."""
    if request.app[SETTINGS_KEY].auth_token is None:
        raise ApiError(
            403,
            "forbidden",
            "Tokens need KV_AUTH_TOKEN: this server has no bootstrap admin token, so every "
            "request may do everything and no token could limit one. Nothing was written.",
        )
    require(request, admin=True)
    return grant_of(request)


def _audit(request: web.Request, event: str, name: str, by: Optional[Grant]) -> None:
    # The names alone: never a secret or its hash, nor a prefix (which may be a key).
    audit_log.info(f"token_{event}", token=name, by=None if by is None else by.name)
    metrics = request.app[METRICS_KEY]
    if metrics is not None:
        metrics.observe_token(event)


def _token_name(request: web.Request) -> str:
    """The token's name from the path; one no token could have is no token."""
    name = request.match_info["name"]
    if not _NAME.fullmatch(name):
        raise _not_found(name)
    return name


def _not_found(name: str) -> ApiError:
    return ApiError(
        404,
        "token_not_found",
        f"No token is named {_shown(name)}; GET /tokens lists them. Nothing was written.",
    )


def _shown(name: str) -> str:
    """A name in a message, as JSON writes it (so that any character shows)."""
    return orjson.dumps(name).decode()


def _checked_rule(settings: Settings, index: int, rule: TokenRuleRequest) -> TokenRule:
    """A rule whose prefix obeys the rules of a key (the empty prefix aside: every key)."""
    broken = rules.broken_rule(settings, rule.prefix) if rule.prefix else None
    if broken == rules.KEY_TOO_LONG:
        raise ApiError(
            422,
            "key_too_long",
            f"rules[{index}].prefix: is longer than the limit of {settings.max_key_bytes} "
            "bytes of UTF-8.",
        )
    if broken is not None:
        raise ApiError(
            422,
            "invalid_string",
            f"rules[{index}].prefix: contains a NUL character (U+0000), which no key holds.",
        )
    return TokenRule(rule.prefix, rule.access)


async def create(request: web.Request) -> web.Response:
    """POST /tokens: a new token, and its secret, shown this once."""
    by = _admin(request)
    body = parse_body(TokenRequest, await request.read())
    settings = request.app[SETTINGS_KEY]
    token_rules = tuple(
        _checked_rule(settings, index, rule) for index, rule in enumerate(body.rules)
    )
    now = _now_ms(request)
    expires_at = None if body.expires_in is None else now + round(body.expires_in * 1000)
    secret = new_secret()
    token = Token(body.name, hash_secret(secret), token_rules, body.admin, now, expires_at)
    try:
        await request.app[STORE_KEY].create_token(token)
    except TokenExists:
        raise ApiError(
            409,
            "token_exists",
            f"A token named {_shown(body.name)} exists already; revoke it first, or rotate its "
            "secret. Nothing was written.",
        ) from None
    _audit(request, "created", token.name, by)
    return _json(_with_secret(token, secret))


async def list_(request: web.Request) -> web.Response:
    """GET /tokens: every token, by name; never a secret or a hash."""
    _admin(request)
    return _json(
        {
            "tokens": [
                {
                    "name": token.name,
                    "rules": _rules(token.rules),
                    "admin": token.admin,
                    "created_at": rules.rfc3339(token.created_at),
                    "expires_at": _time(token.expires_at),
                    "last_used_at": _time(token.last_used_at),
                }
                for token in await request.app[STORE_KEY].tokens()
            ]
        }
    )


async def rotate(request: web.Request) -> web.Response:
    """POST /tokens/{name}/rotate: a new secret; the old one stops now, or after grace."""
    by = _admin(request)
    name = _token_name(request)
    body = parse_body(RotateRequest, await request.read() or b"{}")
    previous_until = _now_ms(request) + round(body.grace * 1000) if body.grace else None
    secret = new_secret()
    try:
        token = await request.app[STORE_KEY].rotate_token(name, hash_secret(secret), previous_until)
    except TokenNotFound:
        raise _not_found(name) from None
    _audit(request, "rotated", name, by)
    return _json(_with_secret(token, secret))


async def revoke(request: web.Request) -> web.Response:
    """DELETE /tokens/{name}: the token stops working at once, on every server."""
    by = _admin(request)
    name = _token_name(request)
    if not await request.app[STORE_KEY].delete_token(name):
        raise _not_found(name)
    _audit(request, "revoked", name, by)
    return _json({"name": name, "revoked": True})


async def whoami(request: web.Request) -> web.Response:
    """GET /tokens/self: the calling token's name, rules and whether it is admin."""
    grant = grant_of(request)
    if grant is None:
        return _json(_OPEN)
    return _json({"name": grant.name, "rules": _rules(grant.rules), "admin": grant.admin})
