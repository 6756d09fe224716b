"""Both twins behind a proxy, as urllib routes the Python twin: https through a CONNECT tunnel that
the proxy cannot read, plain http only with --allow-http-proxy, loopback never. The proxy here is a
small tunnelling server on loopback that records what it saw."""

from __future__ import annotations

import hashlib
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import TEST_KEY
from fake_api import FakeImagesAPI
from twins import run_twin, script_env

HOST = "images.test"     # never resolved here: the proxy takes every tunnel to the fake API


class TunnelProxy(socketserver.ThreadingTCPServer):
    """CONNECT host:port -> a tunnel to the fake API, whatever the host; records requests and bytes."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.connects: list[str] = []
        self.seen = bytearray()
        super().__init__(("127.0.0.1", 0), TunnelHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class TunnelHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: TunnelProxy = self.server  # type: ignore[assignment]
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            piece = self.rfile.read(1)
            if not piece:
                return
            head += piece
        method, target = head.split(b" ")[:2]
        server.connects.append(f"{method.decode()} {target.decode()}")
        server.seen += head
        if method != b"CONNECT":
            self.wfile.write(b"HTTP/1.1 405 Only CONNECT\r\nContent-Length: 0\r\n\r\n")
            return
        with socket.create_connection(("127.0.0.1", server.upstream)) as upstream:
            self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.wfile.flush()
            pump = threading.Thread(target=self.copy, args=(upstream, self.connection), daemon=True)
            pump.start()
            self.copy(self.connection, upstream)
            pump.join(timeout=10)

    def copy(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                piece = source.recv(65536)
                if not piece:
                    break
                self.server.seen += piece  # type: ignore[attr-defined]
                target.sendall(piece)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def tls_api(tmp_path: Path) -> Iterator[tuple[FakeImagesAPI, Path]]:
    import trustme

    authority = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(HOST).configure_cert(context)
    authority.cert_pem.write_to_path(str(tmp_path / "authority.pem"))
    with FakeImagesAPI(tls=context) as server:
        yield server, tmp_path / "authority.pem"


@pytest.fixture
def tunnel(tls_api: tuple[FakeImagesAPI, Path]) -> Iterator[TunnelProxy]:
    proxy = TunnelProxy(int(tls_api[0].url.split(":")[2].split("/")[0]))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield proxy
    proxy.shutdown()
    proxy.server_close()


def proxied_env(proxy_url: str, authority: Path, **more: str) -> dict[str, str]:
    """NO_PROXY cleared so the proxy applies; each twin trusts the test authority its own way."""
    return script_env(NO_PROXY=None, no_proxy=None, https_proxy=proxy_url, APIYI_API_KEY=TEST_KEY,
                      APIYI_WORKER="inprocess", SSL_CERT_FILE=str(authority), NODE_EXTRA_CA_CERTS=str(authority),
                      **more)


def test_https_goes_through_a_connect_tunnel_the_proxy_cannot_read(twin: str, isolated: Path, tunnel: TunnelProxy,
                                                                  tls_api: tuple[FakeImagesAPI, Path]) -> None:
    api, authority = tls_api
    port = api.url.split(":")[2].split("/")[0]
    env = proxied_env(tunnel.url, authority, APIYI_BASE_URL=f"https://{HOST}:{port}/v1")
    done = run_twin(twin, "-p", "一只猫", "-f", "cat.png", env=env, cwd=isolated)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == ["cat.png"]
    assert tunnel.connects == [f"CONNECT {HOST}:{port}"]
    assert api.requests[0].json()["prompt"] == "一只猫"
    assert api.requests[0].header("Authorization") == f"Bearer {TEST_KEY}"
    assert TEST_KEY.encode() not in tunnel.seen and "一只猫".encode() not in tunnel.seen
    assert hashlib.sha256((isolated / "cat.png").read_bytes()).hexdigest()


@pytest.fixture
def http_proxy() -> Iterator[FakeImagesAPI]:
    """A 'proxy' that answers as the API itself, recording the absolute-form request it got."""
    with FakeImagesAPI() as server:
        yield server


def test_plain_http_through_a_proxy_only_when_allowed(twin: str, isolated: Path, http_proxy: FakeImagesAPI,
                                                     api: FakeImagesAPI) -> None:
    env = script_env(NO_PROXY=None, no_proxy=None, http_proxy=http_proxy.url.rsplit("/v1", 1)[0],
                     APIYI_API_KEY=TEST_KEY, APIYI_WORKER="inprocess",
                     APIYI_BASE_URL="http://images.example.invalid/v1")
    refused = run_twin(twin, "-p", "cat", "-f", "cat.png", env=env, cwd=isolated)
    assert refused.returncode == 2 and b"the proxy would read the API key" in refused.stderr
    assert http_proxy.requests == []
    allowed = run_twin(twin, "-p", "cat", "-f", "cat.png", "--allow-http-proxy", env=env, cwd=isolated)
    assert allowed.returncode == 0, allowed.stderr.decode()
    assert http_proxy.requests[0].path == "http://images.example.invalid/v1/images/generations"
    assert http_proxy.requests[0].header("Host") == "images.example.invalid"


def test_loopback_never_goes_through_a_proxy(twin: str, isolated: Path, http_proxy: FakeImagesAPI,
                                             api: FakeImagesAPI) -> None:
    env = script_env(NO_PROXY=None, no_proxy=None, http_proxy=http_proxy.url.rsplit("/v1", 1)[0],
                     https_proxy=http_proxy.url.rsplit("/v1", 1)[0], APIYI_API_KEY=TEST_KEY,
                     APIYI_WORKER="inprocess", APIYI_BASE_URL=api.url)
    done = run_twin(twin, "-p", "cat", "-f", "cat.png", env=env, cwd=isolated)
    assert done.returncode == 0, done.stderr.decode()
    assert len(api.requests) == 1 and http_proxy.requests == []
