"""Who may use the gateway, over TLS, under both worker classes: real processes, a certificate
the test makes with ``openssl req``, a tokens file with one token per role.

With tokens, a request without a valid bearer token is a JSON 401 (with WWW-Authenticate), one
whose role does not allow its route a JSON 403, on the fast lane's routes too; a plain HTTP
client on the HTTPS port gets no answer and the gateway lives on. A bad tokens file stops the
gateway at start with a message naming the line.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import http11
from tests.cluster import READY_TIMEOUT_S, Cluster, wait_for

pytestmark = pytest.mark.process

READER = "read-token-0123456789abcdef"
WRITER = "write-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl (no dependency)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=zkv-test", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


class Gateway:
    """A cluster whose gateway serves HTTPS and wants tokens."""

    def __init__(self, cluster: Cluster, cert: Path) -> None:
        self.cluster = cluster
        self.context = ssl.create_default_context(cafile=str(cert))

    def request(
        self, method: str, path: str, token: str | None = None, body: bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.cluster.http_port, timeout=10, context=self.context
        )
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            found = {k.lower(): v for k, v in response.getheaders()}
        finally:
            connection.close()
        if found.get("content-type") == "application/json":
            return response.status, found, json.loads(data)
        return response.status, found, data


@pytest.fixture(scope="module", params=["event", "gthread"])
def gateway(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    path = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(path)
    tokens = path / "tokens"
    tokens.write_text(f"# test tokens\nread {READER}\nwrite {WRITER}\nadmin {ADMIN}\n")
    tokens.chmod(0o600)
    with Cluster(
        path,
        ZKV_HTTP_WORKER=request.param,
        ZKV_HTTP_TOKENS=str(tokens),
        ZKV_TLS_CERTFILE=str(cert),
        ZKV_TLS_KEYFILE=str(key),
    ) as cluster:
        running = Gateway(cluster, cert)
        try:
            cluster.start(gateway=False)
            cluster.start_gateway()
            wait_for(
                lambda: running.request("GET", "/v1/health", ADMIN)[0] == 200,
                "the HTTPS gateway",
                READY_TIMEOUT_S,
            )
        except BaseException:
            print(cluster.logs())
            raise
        yield running
        assert cluster.gateway is not None and cluster.gateway.poll() is None, cluster.logs()
        logs = cluster.logs()
        # No line per connection (asyncio warned of each TLS connection's EOF), no traceback.
        assert "eof_received" not in logs and "Traceback" not in logs, logs


@pytest.mark.parametrize(
    "path", ["/get?key=k", "/set?key=k&value=v&timeout=5", "/all", "/v1/keys", "/v1/health"]
)
@pytest.mark.parametrize("token", [None, "not-a-token-of-this-gateway"])
def test_no_valid_token_is_a_json_401(gateway: Gateway, path: str, token: str | None) -> None:
    status, headers, body = gateway.request("GET", path, token)
    assert status == 401, body
    assert headers["www-authenticate"].startswith('Bearer realm="zkv"')
    assert "token" in body["error"]


def test_each_role_may_do_what_its_role_allows(gateway: Gateway) -> None:
    # /set, /get and /delete are the fast lane's under the event worker: refused there too.
    status, headers, body = gateway.request("GET", "/set?key=k&value=v&timeout=30", READER)
    assert status == 403
    assert body == {"error": "this token's role (read) may not do this: it needs write"}
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert gateway.request("GET", "/set?key=k&value=v&timeout=30", WRITER)[0] == 200
    assert gateway.request("GET", "/get?key=k", READER)[2]["value"] == "v"
    assert gateway.request("GET", "/delete?key=k", READER)[0] == 403
    assert gateway.request("PUT", "/v1/keys/r", READER, body=b"x")[0] == 403
    assert gateway.request("PUT", "/v1/keys/r", ADMIN, body=b"x")[0] == 200
    assert gateway.request("GET", "/v1/keys/r", READER)[2] == b"x"
    assert gateway.request("DELETE", "/v1/keys/r", WRITER)[0] == 200
    deleted = gateway.request("GET", "/delete?key=k", WRITER)[2]
    assert deleted == {"message": "Value deleted successfully"}


def test_the_health_detail_is_for_admin(gateway: Gateway) -> None:
    assert gateway.request("GET", "/v1/health", READER)[2] == {"status": "ok"}
    detail = gateway.request("GET", "/v1/health", ADMIN)[2]
    assert detail["status"] == "ok" and detail["owned"] == [True, True]


def test_plain_http_on_the_https_port_gets_no_answer_and_the_gateway_lives_on(
    gateway: Gateway,
) -> None:
    with socket.create_connection(("127.0.0.1", gateway.cluster.http_port), timeout=10) as sock:
        sock.sendall(b"GET /get?key=k HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP/1.1 200" not in received
    assert gateway.request("GET", "/get?key=k", READER)[0] == 200


def test_a_bad_tokens_file_stops_the_gateway_naming_the_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"read {READER}\n# fine so far\nwrite\n")
    tokens.chmod(0o600)
    with Cluster(tmp_path, ZKV_HTTP_TOKENS=str(tokens)) as cluster:
        gateway = cluster.start_gateway()
        assert gateway.wait(timeout=30) == 2
        assert f"tokens file {tokens}, line 3: expected 'ROLE TOKEN'" in cluster.logs()


@pytest.mark.parametrize("gateway", ["event"], indirect=True)  # the event worker's bound
def test_handshakes_never_finished_are_bounded_and_the_gateway_serves_on(
    gateway: Gateway,
) -> None:
    # Connections that never finish a TLS handshake cost memory and were not counted by any
    # limit: thousands took 1.6 GB (a hostile test). Past MAX_CLIENT_HANDSHAKES from one
    # address, new ones are closed at once.
    idle = []
    try:
        for _ in range(http11.MAX_CLIENT_HANDSHAKES + 8):
            idle.append(socket.create_connection(("127.0.0.1", gateway.cluster.http_port)))
        closed = 0
        for sock in idle[-8:]:  # the ones past the bound: closed by the gateway, unanswered
            sock.settimeout(5)
            try:
                closed += sock.recv(1) == b""
            except (ConnectionResetError, TimeoutError):
                closed += 0
        assert closed == 8, gateway.cluster.logs()
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: gateway.request("GET", "/v1/health", READER)[0] == 200, "serving again", 10)
    assert "handshakes pending" in gateway.cluster.logs()
