"""A real CNCF distribution registry (Debian's docker-registry, 2.8) on 127.0.0.1, as a fleet's OCI origin.

Started like ``nginx.py`` starts nginx: a config file and filesystem storage in a temp folder, a free port, stopped at
the end. Three ways in: anonymous, htpasswd basic auth (bcrypt hashes from apache2-utils' ``htpasswd``), and the
bearer-token flow with a small token server here (``TokenServer``) issuing ES256 JWTs the registry verifies against
a self-signed certificate (``x5c`` header, ``rootcertbundle``).
"""

from __future__ import annotations

import base64
import datetime
import http.server
import json
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from daemons import free_port, require_tool, stop

USER, PASSWORD = "fleet-publisher", "s3cret-pa55"
SERVICE, ISSUER = "edge-rt-test-registry", "edge-rt-test-token-issuer"
_ACCESS = re.compile(r'^\S+ - \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')

_CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {data}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
{auth}"""


@dataclass
class Access:
    """One line of the registry's access log."""

    method: str
    path: str  # without the query
    status: int
    bytes: int
    query: str = ""
    time: float = 0.0  # seconds since the epoch (the log's resolution: one second)


@dataclass
class Registry:
    """A running registry: its host:port, storage folder and access log; the token server when there is one."""

    host: str
    data: Path
    log_path: Path
    tokens: TokenServer | None = None

    def reference(self, repository: str = "edge/adapters", tag: str | None = None) -> str:
        return f"oci://{self.host}/{repository}" + (f":{tag}" if tag else "")

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def log(self) -> list[Access]:
        """Every request the registry answered so far (its access log: method, path, status, bytes)."""
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = _ACCESS.match(line)
            if match:
                moment, method, target, status, size = match.groups()
                path, _, query = target.partition("?")
                when = datetime.datetime.strptime(moment, "%d/%b/%Y:%H:%M:%S %z").timestamp()
                entries.append(Access(method, path, int(status), 0 if size == "-" else int(size), query, when))
        return entries

    def blob_file(self, sha256: str) -> Path:
        """Where the registry keeps the bytes of a blob (the storage driver's layout)."""
        return self.data / "docker/registry/v2/blobs/sha256" / sha256[:2] / sha256 / "data"


def registry_binary() -> str:
    """docker-registry's path, or a clear failure in CI (which installs it) and a skip elsewhere."""
    return require_tool(("docker-registry", "/usr/bin/docker-registry"), "docker-registry")


def skopeo_binary() -> str:
    return require_tool(("skopeo",), "skopeo")


@contextmanager
def run_registry(*, auth: str = "none") -> Iterator[Registry]:
    """A registry with ``auth`` "none", "basic" (htpasswd: USER/PASSWORD) or "token" (bearer, ``TokenServer``)."""
    binary = registry_binary()
    base = Path(tempfile.mkdtemp(prefix="edge-rt-registry-"))
    (base / "data").mkdir()
    port = free_port()
    tokens: TokenServer | None = None
    auth_config = ""
    if auth == "basic":
        htpasswd = require_tool(("htpasswd",), "apache2-utils")
        line = subprocess.run([htpasswd, "-Bbn", USER, PASSWORD], check=True, capture_output=True, text=True)
        (base / "htpasswd").write_text(line.stdout)
        auth_config = f"auth:\n  htpasswd:\n    realm: edge-rt-test\n    path: {base / 'htpasswd'}\n"
    elif auth == "token":
        tokens = TokenServer.start(base)
        auth_config = (f"auth:\n  token:\n    realm: {tokens.url}/token\n    service: {SERVICE}\n"
                       f"    issuer: {ISSUER}\n    rootcertbundle: {tokens.cert_path}\n")
    elif auth != "none":
        raise ValueError(auth)
    (base / "config.yml").write_text(_CONFIG.format(data=base / "data", port=port, auth=auth_config))
    log_path = base / "registry.log"
    with log_path.open("wb") as sink:
        process = subprocess.Popen([binary, "serve", str(base / "config.yml")], stdout=sink, stderr=subprocess.STDOUT)
    registry = Registry(host=f"127.0.0.1:{port}", data=base / "data", log_path=log_path, tokens=tokens)
    try:
        for _ in range(200):
            if process.poll() is not None:
                raise AssertionError(f"the registry exited: {log_path.read_text(errors='replace')}")
            try:
                requests.get(f"{registry.url}/v2/", timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        yield registry
    finally:
        stop(process, signal.SIGTERM, timeout_s=10)
        if tokens is not None:
            tokens.close()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class TokenServer:
    """The registry's token realm: checks USER/PASSWORD (basic auth) and issues a JWT for the requested scope."""

    url: str
    cert_path: Path
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes
    server: http.server.ThreadingHTTPServer
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (scope, user) per token request

    @classmethod
    def start(cls, folder: Path) -> TokenServer:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-rt test token issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        cert_path = folder / "token-issuer.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        port = free_port()
        owner: list[TokenServer] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                owner[0].answer(self)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        tokens = cls(url=f"http://127.0.0.1:{port}", cert_path=cert_path, key=key,
                     cert_der=cert.public_bytes(serialization.Encoding.DER), server=server)
        owner.append(tokens)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return tokens

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(handler.path).query)
        scope = " ".join(query.get("scope", []))
        user = _basic_user(handler.headers.get("Authorization"))
        self.requests.append((scope, user[0] if user else None))
        if user != (USER, PASSWORD) or query.get("service") != [SERVICE]:
            handler.send_response(401)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        body = json.dumps({"token": self.issue(scope), "expires_in": 300}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def issue(self, scope: str) -> str:
        """A JWT granting ``scope`` (``repository:NAME:ACTIONS``, space-separated) for five minutes."""
        access = []
        for item in scope.split():
            kind, _, rest = item.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _basic_user(header: str | None) -> tuple[str, str] | None:
    if not header or not header.startswith("Basic "):
        return None
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password
