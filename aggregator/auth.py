"""Bearer-token authentication for ingest and the read API (RFC 6750).

In:  the `Authorization` header of a request.  Out: nothing (allowed) or an HTTP 401/403.

Two tokens with two scopes: the ingest token may only POST batches, the read token may only read.
- no or malformed `Authorization` header -> 401 with `WWW-Authenticate: Bearer`
- a token that is neither -> 401 (`invalid_token`)
- the other scope's token (read token on ingest, ingest token on reads) -> 403
Tokens are compared in constant time (`hmac.compare_digest`) against both scopes every time, so
the response time does not tell which token a guess was close to. With `--insecure-open` (only on
loopback) the read API needs no token; ingest still needs its token when one is configured.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aggregator.settings import AggregatorSettings

Scope = Literal["ingest", "read"]
_bearer = HTTPBearer(auto_error=False, description="ingest token for /api/v1/ingest, read token "
                     "for the read API")


def _same(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        hmac.compare_digest(b"x", b"y")  # keep the work constant
        return False
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class Authenticator:
    def __init__(self, settings: AggregatorSettings) -> None:
        self.tokens: dict[Scope, str | None] = {"ingest": settings.ingest_token,
                                                "read": settings.read_token}
        self.open: dict[Scope, bool] = {
            "ingest": settings.insecure_open and not settings.ingest_token,
            "read": settings.insecure_open,
        }

    def check(self, scope: Scope, token: str | None) -> None:
        if self.open[scope]:
            return
        if not token:
            raise HTTPException(401, f"missing bearer token ({scope} token required)",
                                headers={"WWW-Authenticate": f'Bearer scope="{scope}"'})
        other: Scope = "read" if scope == "ingest" else "ingest"
        right = _same(token, self.tokens[scope])
        wrong_scope = _same(token, self.tokens[other])
        if right:
            return
        if wrong_scope:
            raise HTTPException(403, f"this token is the {other} token: it cannot be used for {scope}")
        raise HTTPException(401, "invalid token",
                            headers={"WWW-Authenticate": f'Bearer error="invalid_token", scope="{scope}"'})


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def _token(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


def require_ingest(request: Request, creds: Credentials) -> None:
    request.app.state.auth.check("ingest", _token(creds))


def require_read(request: Request, creds: Credentials) -> None:
    request.app.state.auth.check("read", _token(creds))
