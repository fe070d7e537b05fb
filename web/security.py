"""Who may do what, and which files may be served.

Reads are open to whoever reaches the port (bind to loopback, the default, to keep it local).
A write (POST) must pass `Guard.check`: not read-only; sent by the page's own fetch() (a custom
header, which a cross-site form cannot send and a cross-site fetch cannot send without a CORS
preflight that is never granted); from our own origin (Sec-Fetch-Site / Origin); and carrying
the token when one is configured. Files are only ever served by resolving a relative name under
one of the configured folders (`resolve_under`).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from pathlib import Path

from core.config import Config, ConfigError

REQUEST_HEADER = "x-upscaled-request"  # set by the page's fetch(); never by a plain cross-site form
TOKEN_HEADER = "x-upscaled-token"
LOOPBACK_NAMES = ("localhost", "localhost.localdomain")
DEFAULT_PORTS = {"http": 80, "https": 443}


class Refused(Exception):
    """A request that is not allowed; `status` is the HTTP status, the message is for people."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Host = uri-host [ ":" port ] (RFC 9110 7.2): a name, an IPv4 address or a bracketed IPv6
# literal. No user info, no path, no spaces: "evil@localhost" is not a host.
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")


def parse_host(value: str) -> tuple[str, int | None] | None:
    """(host name, port) of a Host header or an origin's authority, normalised for comparison:
    lower case, no trailing dot, IPv6 without brackets in canonical form; None when it is not a
    plain host[:port]."""
    m = _HOST.fullmatch(value or "")
    if m is None:
        return None
    name = m.group(1).lower().rstrip(".")
    if name.startswith("["):
        try:
            name = str(ipaddress.IPv6Address(name[1:-1]))
        except ValueError:
            return None
    port = int(m.group(2)) if m.group(2) else None
    if not name or (port is not None and port > 65535):
        return None
    return name, port


def parse_origin(value: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin header, the port made explicit; None if malformed."""
    scheme, sep, authority = (value or "").partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        return None
    hp = parse_host(authority)
    return None if hp is None else (scheme, hp[0], hp[1] or DEFAULT_PORTS[scheme])


def is_loopback(host: str) -> bool:
    """`host`: a name as parse_host gives it."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_token(cfg: Config) -> str | None:
    """web.token, or the first line of web.token_file (relative to the config's folder)."""
    w = cfg.web
    if w.token is not None:
        return w.token
    if w.token_file is None:
        return None
    path = cfg.resolve(w.token_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError("web.token_file", f"a readable file ({e.strerror or e})", str(path)) from None
    token = lines[0].strip() if lines else ""
    if len(token) < 16:
        raise ConfigError("web.token_file", "a file whose first line is a secret of at least 16 characters", str(path))
    return token


class Guard:
    def __init__(self, token: str | None, read_only: bool):
        self.token = token
        self.read_only = read_only

    def describe(self) -> dict:
        return {"read_only": self.read_only, "token_required": self.token is not None}

    def check(self, headers, scheme: str) -> None:
        """Raise Refused unless this POST may change something. `headers`: lower-case names."""
        if self.read_only:
            raise Refused(403, "this page is read-only (web.read_only: true)")
        if headers.get(REQUEST_HEADER) != "1":
            raise Refused(403, f"refused: not sent by the page (no {REQUEST_HEADER} header)")
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise Refused(403, f"refused: a cross-site request (Sec-Fetch-Site: {site})")
        origin = headers.get("origin")
        if origin is not None:
            # Both sides normalised (case, default port, brackets) and strictly parsed: a Host of
            # "LOCALHOST:8080" is the origin http://localhost:8080, "evil@localhost" is nothing.
            host = parse_host(headers.get("host", ""))
            scheme = scheme.lower()
            ours = host and (scheme, host[0], host[1] or DEFAULT_PORTS.get(scheme))
            if parse_origin(origin) is None or parse_origin(origin) != ours:
                raise Refused(403, f"refused: a request from another origin ({origin[:200]!r})")
        if self.token is not None and not self.has_token(headers):
            raise Refused(401, "refused: this action needs the token (web.token or web.token_file)")

    def has_token(self, headers) -> bool:
        """Whether the request carries the configured token (False when none is configured)."""
        if self.token is None:
            return False
        given = headers.get(TOKEN_HEADER, "")
        auth = headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode())


def clean_relative(rel: str) -> str:
    """A relative POSIX path as given by a client, checked part by part: no absolute paths, no
    `..`, `.` or empty parts, no hidden names (the work folder, temp files), no NUL or backslash."""
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        raise Refused(404, "no such file")
    parts = rel.split("/")
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise Refused(404, "no such file")
    return "/".join(parts)


def resolve_under(root: Path, rel: str) -> Path:
    """`root/rel` for an existing regular file that really lies under `root`: symlinks are
    followed and the result must still be inside (Path.resolve, is_relative_to)."""
    rel = clean_relative(rel)
    base = Path(os.path.realpath(root))
    try:
        target = (base / rel).resolve(strict=True)
    except (OSError, RuntimeError):
        raise Refused(404, "no such file") from None
    if not target.is_relative_to(base) or not target.is_file():
        raise Refused(404, "no such file")
    return target


class LoopbackHostsOnly:
    """ASGI middleware for a page bound to loopback: refuse requests whose Host header names
    anything but a loopback address. A web site whose name an attacker re-points at 127.0.0.1
    (DNS rebinding) would otherwise be "same origin" with this page in the visitor's browser."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            hosts = [v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"host"]
            host = hosts[0] if len(hosts) == 1 else ""  # none, or two (which one would a proxy use?)
            parsed = parse_host(host)
            if parsed is None or not is_loopback(parsed[0]):
                from starlette.responses import PlainTextResponse

                await PlainTextResponse(f"refused: this page answers to loopback host names only, not {host[:200]!r}",
                                        status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


SECURITY_HEADERS = {
    # Scripts, styles and images from this server only; nothing may frame the page.
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
