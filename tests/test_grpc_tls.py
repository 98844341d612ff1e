"""TLS and mutual TLS of the gRPC control plane, on loopback ports.

The server is `editserve.control.server.start_server` / `maybe_start` (the code ``editserve serve``
runs: the same service, interceptor and credentials) over a real `ControlPlane` whose ledger is
a real SQLite ledger but which has started no engine, so the calls that need only the ledger
(Status, ListVersions, health checking) are answered; starting vLLM for this would cost minutes.
Certificates (a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
second CA that nobody trusts) are made per module with ``cryptography``.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

x509 = pytest.importorskip("cryptography.x509")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

from editserve.cli import main as cli_main  # noqa: E402
from editserve.client import ControlError, EditClient  # noqa: E402
from editserve.control.auth import TLSConfig, TokenTable  # noqa: E402
from editserve.control.operations import Operations  # noqa: E402
from editserve.control.server import maybe_start, start_server  # noqa: E402
from editserve.engine.control import ControlPlane, ControlSettings  # noqa: E402
from editserve.ledger import Ledger  # noqa: E402

FP = hashlib.sha256(b"tls test model").hexdigest()
VIEWER = "viewer-token-tls-0123"


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path              # a CA nobody trusts
    rogue_cert: Path            # a client certificate it signed
    rogue_key: Path


def _name(cn: str) -> Any:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: Any, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert: Any, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str) -> tuple[Any, Any]:
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _leaf(cn: str, ca: tuple[Any, Any], usage: Any, sans: list[Any] | None = None) -> tuple[Any, Any]:
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    import ipaddress

    d = tmp_path_factory.mktemp("certs")
    ca = _ca("editserve test CA")
    rogue = _ca("rogue CA")
    server = _leaf("editserve server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
                   [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _leaf("editserve client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    rogue_client = _leaf("rogue client", rogue, ExtendedKeyUsageOID.CLIENT_AUTH)
    return Certs(ca=_write_cert(ca[0], d / "ca.pem"), server_cert=_write_cert(server[0], d / "server.pem"),
                 server_key=_write_key(server[1], d / "server.key"),
                 client_cert=_write_cert(client[0], d / "client.pem"),
                 client_key=_write_key(client[1], d / "client.key"),
                 rogue_ca=_write_cert(rogue[0], d / "rogue-ca.pem"),
                 rogue_cert=_write_cert(rogue_client[0], d / "rogue.pem"),
                 rogue_key=_write_key(rogue_client[1], d / "rogue.key"))


# ------------------------------------------------------------------------------ server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackServer:
    """A gRPC control-plane server on its own event loop thread (as in vLLM's API server)."""

    def __init__(self, tmp: Path) -> None:
        self.ledger = Ledger.open(tmp / "ledger", model_fingerprint=FP)
        self.control = ControlPlane(None, ControlSettings(model=None))
        self.control.ledger = self.ledger        # what `start` opens; no engine, no sidecar
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop", daemon=True)
        self.thread.start()
        self.target = f"127.0.0.1:{_free_port()}"
        self.server: Any = None

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self, tls: TLSConfig | None) -> "LoopbackServer":
        tokens = TokenTable()
        tokens.add(VIEWER, "viewer", "tls-viewer")
        self.server = self.run(start_server(Operations(self.control, tokens), self.target, tls))
        return self

    def start_from_env(self, env: dict[str, str]) -> "LoopbackServer":
        self.server = self.run(maybe_start(self.control, {"EDITSERVE_GRPC_ADDR": self.target, **env}))
        return self

    def start_on(self, addr: str, env: dict[str, str]) -> "LoopbackServer":
        """maybe_start on `addr` (the test then reaches it on 127.0.0.1 at the same port)."""
        self.server = self.run(maybe_start(self.control, {"EDITSERVE_GRPC_ADDR": addr, **env}))
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        self.ledger.close()


@pytest.fixture()
def loopback(tmp_path: Path) -> Any:
    s = LoopbackServer(tmp_path)
    yield s
    s.stop()


def _health(target: str, creds: grpc.ChannelCredentials) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.secure_channel(target, creds) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="editserve.v1.EditService"), timeout=20).status


def _refused(**kw: Any) -> ControlError:
    with EditClient(timeout_s=20, **kw) as c:
        with pytest.raises(ControlError) as e:
            c.status()
    return e.value


# ------------------------------------------------------------------------------ tests


def test_tls_serves_status_and_refuses_plaintext(loopback: LoopbackServer, certs: Certs) -> None:
    from grpc_health.v1 import health_pb2

    loopback.start(TLSConfig(cert=str(certs.server_cert), key=str(certs.server_key)))
    with EditClient(loopback.target, VIEWER, ca=str(certs.ca), timeout_s=20) as c:
        st = c.status()
        assert st.ledger_head == 0 and st.served_version == -1 and not st.sidecar_alive
        assert st.ledger_root == str(loopback.ledger.root)
        versions = c.versions()
        assert [v.kind for v in versions.versions] == ["base"] and versions.head == 0
    assert _health(loopback.target, grpc.ssl_channel_credentials(certs.ca.read_bytes())) == \
        health_pb2.HealthCheckResponse.SERVING
    # A plaintext client, or one that trusts another CA, gets no connection.
    assert _refused(target=loopback.target, token=VIEWER).code == "UNAVAILABLE"
    assert _refused(target=loopback.target, token=VIEWER, ca=str(certs.rogue_ca)).code == "UNAVAILABLE"
    # TLS does not replace the token.
    assert _refused(target=loopback.target, token="", ca=str(certs.ca)).code == "UNAUTHENTICATED"


def test_mutual_tls_needs_a_client_certificate_of_the_ca(loopback: LoopbackServer, certs: Certs) -> None:
    from grpc_health.v1 import health_pb2

    token = "admin-token-tls-0123"
    loopback.start_from_env({"EDITSERVE_CONTROL_TOKEN": token, "EDITSERVE_GRPC_TLS_CERT": str(certs.server_cert),
                             "EDITSERVE_GRPC_TLS_KEY": str(certs.server_key),
                             "EDITSERVE_GRPC_TLS_CLIENT_CA": str(certs.ca)})
    with EditClient(loopback.target, token, ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key),
                    timeout_s=20) as c:
        assert c.status().ledger_head == 0
    # Without a client certificate, with one of another CA, or in plaintext: refused.
    assert _refused(target=loopback.target, token=token, ca=str(certs.ca)).code == "UNAVAILABLE"
    assert _refused(target=loopback.target, token=token, ca=str(certs.ca), cert=str(certs.rogue_cert),
                    key=str(certs.rogue_key)).code == "UNAVAILABLE"
    assert _refused(target=loopback.target, token=token).code == "UNAVAILABLE"
    own = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.client_key.read_bytes(),
                                       certs.client_cert.read_bytes())
    assert _health(loopback.target, own) == health_pb2.HealthCheckResponse.SERVING        # also behind mutual TLS
    with pytest.raises(grpc.RpcError) as e:
        _health(loopback.target, grpc.ssl_channel_credentials(certs.ca.read_bytes()))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cli_over_mutual_tls(loopback: LoopbackServer, certs: Certs, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    loopback.start(TLSConfig(cert=str(certs.server_cert), key=str(certs.server_key), client_ca=str(certs.ca)))
    token = tmp_path / "token"
    token.write_text(VIEWER + "\n")
    common = ["--server", loopback.target, "--token-file", str(token), "--ca", str(certs.ca)]
    assert cli_main(["status", *common, "--cert", str(certs.client_cert), "--key", str(certs.client_key)]) == 0
    out = capsys.readouterr().out
    assert "ledger head" in out and str(loopback.ledger.root) in out
    assert cli_main(["versions", *common, "--cert", str(certs.client_cert), "--key", str(certs.client_key)]) == 0
    assert "head = version 0" in capsys.readouterr().out
    assert cli_main(["status", *common]) == 3
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_config_needs_cert_and_key() -> None:
    from editserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="EDITSERVE_GRPC_TLS_KEY"):
        TLSConfig.from_env({"EDITSERVE_GRPC_TLS_CERT": "/x.pem"})
    assert TLSConfig.from_env({}) is None
    cfg = TLSConfig.from_env({"EDITSERVE_GRPC_TLS_CERT": "/c", "EDITSERVE_GRPC_TLS_KEY": "/k",
                              "EDITSERVE_GRPC_TLS_CLIENT_CA": "/ca"})
    assert cfg == TLSConfig(cert="/c", key="/k", client_ca="/ca")


# ------------------------------------------------------------------------------ secure defaults


def test_default_address_is_loopback_and_always_on() -> None:
    from editserve.control.server import DEFAULT_ADDR, GrpcSettings, is_loopback

    assert DEFAULT_ADDR == "127.0.0.1:50051" and GrpcSettings.from_env({}).addr == DEFAULT_ADDR
    assert GrpcSettings.from_env({"EDITSERVE_GRPC_ADDR": "off"}).addr is None
    assert all(is_loopback(a) for a in ("127.0.0.1:1", "localhost:1", "[::1]:1", "unix:/tmp/x", "127.1.2.3:5"))
    assert not any(is_loopback(a) for a in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1", "editserve:50051"))


def test_plaintext_on_a_non_loopback_address_is_refused(loopback: LoopbackServer, tmp_path: Path) -> None:
    from editserve.control.server import GrpcSettings, InsecureAddress

    port = _free_port()
    env = {"EDITSERVE_CONTROL_TOKEN": VIEWER + "-admin", "EDITSERVE_HOME": str(tmp_path)}
    for addr in (f"0.0.0.0:{port}", f"[::]:{port}"):
        with pytest.raises(InsecureAddress, match="--insecure"):
            loopback.start_on(addr, env)
        with pytest.raises(InsecureAddress):
            GrpcSettings.from_env({"EDITSERVE_GRPC_ADDR": addr})
    assert loopback.server is None
    with socket.socket() as s:                       # nothing listens there
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_insecure_opt_in_starts_and_warns(loopback: LoopbackServer, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    port = _free_port()
    token = "admin-token-insecure-01"
    tree = logging.getLogger("editserve")
    for h in [h for h in tree.handlers if h.name == "editserve"]:   # ensure_log_output adds it anew, to this stderr
        tree.removeHandler(h)
    loopback.start_on(f"0.0.0.0:{port}", {"EDITSERVE_CONTROL_TOKEN": token, "EDITSERVE_GRPC_INSECURE": "1",
                                          "EDITSERVE_HOME": str(tmp_path)})
    err = capsys.readouterr().err
    assert "WARNING editserve.control.server: WARNING: the gRPC control plane listens in PLAINTEXT" in err, err
    with EditClient(f"127.0.0.1:{port}", token, timeout_s=20) as c:
        assert c.status().ledger_head == 0
    assert _refused(target=f"127.0.0.1:{port}", token="").code == "UNAUTHENTICATED"


def test_no_token_configured_creates_the_local_admin_token(loopback: LoopbackServer, tmp_path: Path) -> None:
    from editserve.control.home import local_admin_token, local_tokens_file

    home = tmp_path / "home"
    loopback.start_from_env({"EDITSERVE_HOME": str(home)})
    path = local_tokens_file({"EDITSERVE_HOME": str(home)})
    assert path.stat().st_mode & 0o777 == 0o600
    token = local_admin_token({"EDITSERVE_HOME": str(home)})
    assert token and len(token) >= 32
    with EditClient(loopback.target, token, timeout_s=20) as c:
        assert c.status().ledger_head == 0
    assert _refused(target=loopback.target, token="").code == "UNAUTHENTICATED"
    assert _refused(target=loopback.target, token="not-the-local-token").code == "UNAUTHENTICATED"


def test_watch_streams_are_capped(loopback: LoopbackServer, tmp_path: Path) -> None:
    """Beyond EDITSERVE_MAX_EVENT_STREAMS concurrent WatchEvents streams: RESOURCE_EXHAUSTED; a
    closed stream frees its place."""
    from editserve.control.gen import pb2

    token = "admin-token-streams-01"
    loopback.start_from_env({"EDITSERVE_CONTROL_TOKEN": token, "EDITSERVE_MAX_EVENT_STREAMS": "2",
                             "EDITSERVE_HOME": str(tmp_path)})
    with EditClient(loopback.target, token, timeout_s=20) as c:
        meta = c._metadata()
        streams = [c.stub.WatchEvents(pb2.WatchEventsRequest(), metadata=meta) for _ in range(2)]
        assert [next(s).kind for s in streams] == ["watching", "watching"]
        extra = c.stub.WatchEvents(pb2.WatchEventsRequest(), metadata=meta)
        with pytest.raises(grpc.RpcError) as e:
            next(extra)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit is 2" in e.value.details()
        streams[0].cancel()
        deadline = time.monotonic() + 20
        while True:                                   # the server notices the cancellation asynchronously
            again = c.stub.WatchEvents(pb2.WatchEventsRequest(), metadata=meta)
            try:
                assert next(again).kind == "watching"
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.5)
        again.cancel()
        streams[1].cancel()


def test_editserve_serve_refuses_plaintext_on_a_non_loopback_address(tmp_path: Path) -> None:
    """The real ``editserve serve`` command stops before vLLM starts, with a one-line error."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "EDITSERVE_GRPC_ADDR": f"0.0.0.0:{_free_port()}", "EDITSERVE_HOME": str(tmp_path)}
    env.pop("EDITSERVE_GRPC_INSECURE", None)
    env.pop("EDITSERVE_GRPC_TLS_CERT", None)
    out = subprocess.run([sys.executable, "-m", "editserve.cli", "serve", "--port", str(_free_port())],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "refusing plaintext gRPC on '0.0.0.0:" in out.stderr and "--insecure" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Starting vLLM" not in out.stderr
