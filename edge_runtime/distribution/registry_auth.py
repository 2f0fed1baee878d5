"""Registry authentication the way ``docker`` and ``skopeo`` users expect it.

- **Credentials**: ``EDGE_RT_REGISTRY_USERNAME`` / ``EDGE_RT_REGISTRY_PASSWORD``, else the registry's entry in the
  ``auths`` of Docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``): ``auth`` (base64 ``user:password``)
  or ``username`` and ``password``. Credential helpers (``credsStore``, ``credHelpers``) and identity tokens are
  not run: a registry that asks for credentials then gets a ``RegistryAuthFailed`` saying so.
- **Challenges** (the distribution specification's token flow): a request answered 401 with
  ``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` gets a token from the realm (with the credentials as
  basic auth, or anonymously) and is sent again with ``Authorization: Bearer``; ``Basic`` challenges get the
  credentials. The header is then sent with every later request to that registry until it is refused again.
- **Only the registry's origin sees it.** A blob GET the registry redirects to object storage reaches another
  origin: no ``Authorization`` goes there (aiohttp drops the session's header on a cross-origin redirect, and this
  middleware adds it only for the registry's own origin).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import ClientHandlerType, ClientRequest, ClientResponse, hdrs
from yarl import URL

from edge_runtime import settings
from edge_runtime.errors import EdgeRtError, FileTooLarge, RegistryAuthFailed, TransferFailed
from edge_runtime.files import read_bounded

__all__ = ["AuthFailure", "Credentials", "RegistryAuth", "auth_errors", "find_credentials", "parse_challenge"]

MAX_CONFIG_BYTES = 1 << 20
MAX_TOKEN_BYTES = 64 << 10
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@dataclass(frozen=True)
class Credentials:
    """A username and password for one registry (the password never appears in a repr or a message)."""

    username: str
    password: str = field(repr=False)
    origin: str  # where they came from, for messages: an environment variable or a config file


@dataclass(frozen=True)
class _Lookup:
    credentials: Credentials | None
    helper: str | None  # a credential helper config.json names for this registry (not run)


def find_credentials(host: str) -> Credentials | None:
    """The credentials edge-rt would send to ``host`` (``HOST[:PORT]``), or None: anonymous."""
    return _lookup(host).credentials


def _lookup(host: str) -> _Lookup:
    pair = settings.registry_credentials()
    if pair is not None:
        return _Lookup(Credentials(pair[0], pair[1], origin="EDGE_RT_REGISTRY_USERNAME/PASSWORD"), None)
    path = settings.docker_config_file()
    try:
        data = json.loads(read_bounded(path, MAX_CONFIG_BYTES))
    except FileNotFoundError:
        return _Lookup(None, None)
    except (OSError, FileTooLarge, ValueError, RecursionError) as exc:  # ValueError: not UTF-8/JSON, huge ints
        raise RegistryAuthFailed(
            host,
            f"cannot read {path}: {exc}",
            status=None,
            fix=f"Fix or move {path}, or set EDGE_RT_REGISTRY_USERNAME/PASSWORD",
        ) from exc
    if not isinstance(data, dict):
        return _Lookup(None, None)
    entry = _auths_entry(data.get("auths"), host)
    helpers = data.get("credHelpers")
    helper = helpers.get(host) if isinstance(helpers, dict) else None
    helper = helper or data.get("credsStore")
    if entry is None:
        return _Lookup(None, helper if isinstance(helper, str) else None)
    return _Lookup(_entry_credentials(entry, path, host), None)


def _auths_entry(auths: object, host: str) -> dict[str, object] | None:
    """The ``auths`` entry for ``host``: keys may be ``host:port`` or a URL (``https://host/v1/``)."""
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if isinstance(key, str) and isinstance(entry, dict) and _auths_host(key) == host.lower():
            return entry
    return None


def _auths_host(key: str) -> str:
    key = key.strip().lower()
    key = key.split("://", 1)[1] if "://" in key else key
    return key.split("/", 1)[0]


def _entry_credentials(entry: dict[str, object], path: Path, host: str) -> Credentials | None:
    if isinstance(entry.get("identitytoken"), str) and entry["identitytoken"]:
        raise RegistryAuthFailed(
            host, f"{path} holds an identity token (OAuth) for {host}, which edge-rt does not exchange", status=None
        )
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RegistryAuthFailed(
                host, f"the auths entry for {host} in {path} is not base64 of user:password", status=None
            ) from exc
        if not sep:
            raise RegistryAuthFailed(
                host, f"the auths entry for {host} in {path} has no ':' between user and password", status=None
            )
        return Credentials(user, password, origin=str(path))
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret, origin=str(path))
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``WWW-Authenticate`` → (lower-cased scheme, parameters), e.g. ``("bearer", {"realm": ..., "scope": ...})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return scheme.lower(), params


class AuthFailure(Exception):
    """Carries an auth error out of the middleware: aiohttp would turn an ``OSError`` raised there (every
    ``TransferFailed`` is a ``ConnectionError``) into a ``ClientOSError`` that the transfer code retries."""

    def __init__(self, error: EdgeRtError) -> None:
        super().__init__(str(error))
        self.error = error


@contextmanager
def auth_errors() -> Iterator[None]:
    """Re-raise the typed error an ``AuthFailure`` carries (around every request through ``RegistryAuth``)."""
    try:
        yield
    except AuthFailure as failure:
        raise failure.error from None


class RegistryAuth:
    """An aiohttp client middleware answering one registry's 401 challenges (basic or bearer token)."""

    def __init__(self, host: str, origin: URL) -> None:
        self.host = host
        self.origin = origin
        self._authorization: str | None = None
        self._lock = asyncio.Lock()
        self._lookup: _Lookup | None = None
        self.token_requests = 0  # tokens fetched from a realm (a bearer registry's cost, in the fleet benchmark)

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        if request.url.origin() != self.origin:  # a redirect to object storage: never the registry's credentials
            request.headers.pop(hdrs.AUTHORIZATION, None)
            return await handler(request)
        sent = self._authorization
        if sent is not None:
            request.headers[hdrs.AUTHORIZATION] = sent
        response = await handler(request)
        if response.status != 401:
            return response
        challenge = response.headers.get(hdrs.WWW_AUTHENTICATE, "")
        response.release()
        async with self._lock:
            if self._authorization == sent:  # nobody answered this challenge meanwhile
                try:
                    self._authorization = await self._answer(challenge, request, sent)
                except EdgeRtError as exc:
                    self._forget()
                    raise AuthFailure(exc) from exc
            authorization = self._authorization
        assert authorization is not None
        request.headers[hdrs.AUTHORIZATION] = authorization
        response = await handler(request)
        if response.status == 401:
            response.release()
            failure = RegistryAuthFailed(str(request.url), f"{self.host} refused {self._who()}")
            self._forget()
            raise AuthFailure(failure)
        return response

    def _forget(self) -> None:
        """After a refusal: read the credentials again next time (a daemon outlives a `docker login`)."""
        self._lookup = None
        self._authorization = None

    def _who(self) -> str:
        credentials = self._lookup.credentials if self._lookup else None
        return (
            "anonymous access"
            if credentials is None
            else f"the credentials of {credentials.username!r} (from {credentials.origin})"
        )

    def _credentials(self, url: str) -> Credentials | None:
        if self._lookup is None:
            self._lookup = _lookup(self.host)
        if self._lookup.credentials is None and self._lookup.helper is not None:
            raise RegistryAuthFailed(
                url,
                f"{self.host} asks for credentials and Docker's config names the credential "
                f"helper {self._lookup.helper!r}, which edge-rt does not run (not supported)",
            )
        return self._lookup.credentials

    async def _answer(self, challenge: str, request: ClientRequest, sent: str | None) -> str:
        url = str(request.url)
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            credentials = self._credentials(url)
            if credentials is None:
                raise RegistryAuthFailed(url, f"{self.host} asks for credentials and none are configured")
            value = "Basic " + base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
            if value == sent:
                raise RegistryAuthFailed(url, f"{self.host} refused {self._who()}")
            return value
        if scheme == "bearer" and params.get("realm"):  # a new token for the challenge's scope (push needs more)
            return "Bearer " + await self._token(request, params)
        raise RegistryAuthFailed(
            url,
            f"{self.host} answered 401 with a challenge edge-rt does not speak: {challenge[:200]!r}",
            fix="Use a registry with basic or bearer-token auth",
        )

    async def _token(self, request: ClientRequest, params: dict[str, str]) -> str:
        realm = params["realm"]
        credentials = self._credentials(str(request.url))
        query = [(key, params[key]) for key in ("service", "scope") if params.get(key)]
        auth = None if credentials is None else aiohttp.BasicAuth(credentials.username, credentials.password)
        self.token_requests += 1
        try:
            async with request.session.get(
                realm, params=query, auth=auth, middlewares=(), allow_redirects=False
            ) as response:
                if response.status in (401, 403):
                    raise RegistryAuthFailed(
                        realm,
                        f"the token service of {self.host} refused {self._who()} (HTTP {response.status})",
                        status=response.status,
                    )
                if response.status != 200:
                    raise TransferFailed(
                        realm, f"the token service answered HTTP {response.status}", status=response.status
                    )
                body = await response.content.read(MAX_TOKEN_BYTES + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransferFailed(realm, f"the token service is unreachable ({type(exc).__name__}: {exc})") from exc
        try:
            data = json.loads(body) if len(body) <= MAX_TOKEN_BYTES else None
        except (ValueError, RecursionError):  # not UTF-8, not JSON, a 5,000-digit number, absurd nesting
            data = None
        token = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise TransferFailed(realm, "the token service's answer holds no token")
        if not all("!" <= c <= "~" for c in token):  # a header value: printable ASCII (RFC 6750's token68 and more)
            raise TransferFailed(realm, "the token service's token holds spaces, control or non-ASCII characters")
        return token
