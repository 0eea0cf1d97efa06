"""KVClient over TLS against a real kvd serving TLS (docs/DESIGN.md §12).

The CA and certificates are made with the ``openssl`` command (the test is
skipped without it): a node certificate naming ``kvd://node/n0``, and a
client certificate of the same CA that names no node.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.client import KVClient, tls_context
from kvstore.cluster import find_bin_dir, free_port
from kvstore.errors import TLSError

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _make_certs(d: Path) -> None:
    """ca.pem; n0.pem / n0-key.pem (a node); client.pem / client-key.pem."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca.pem"),
             "-days", "2", "-subj", "/CN=kvstore test CA")
    for name, uri in (("n0", ",URI:kvd://node/n0"), ("client", "")):
        ext = d / f"{name}.ext"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            f"subjectAltName=DNS:localhost,IP:127.0.0.1{uri}\n"
        )
        csr = d / f"{name}.csr"
        _openssl("req", *ec, "-keyout", str(d / f"{name}-key.pem"), "-out", str(csr),
                 "-subj", f"/CN={name}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(d / "ca.pem"),
                 "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
                 "-out", str(d / f"{name}.pem"), "-extfile", str(ext))


def _healthy(port: int, ca: Path) -> bool:
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=tls_context(ca))
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@pytest.fixture
def tls_node(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A TLS kvd (node n0, client CA on); yields its URL and the certs dir."""
    certs = tmp_path / "tls"
    certs.mkdir()
    _make_certs(certs)
    port = free_port()
    log = (tmp_path / "kvd.log").open("wb")
    proc = subprocess.Popen(
        [str(find_bin_dir(None) / "kvd"), "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--node-id", "n0",
         "--tls-cert", str(certs / "n0.pem"), "--tls-key", str(certs / "n0-key.pem"),
         "--tls-client-ca", str(certs / "ca.pem")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port, certs / "ca.pem"):
            assert proc.poll() is None, (tmp_path / "kvd.log").read_text()
            assert time.monotonic() < deadline, "kvd did not become healthy over TLS"
            time.sleep(0.02)
        yield f"https://127.0.0.1:{port}", certs
    finally:
        proc.kill()
        proc.wait(timeout=30)
        log.close()


def test_a_client_with_the_ca_reads_and_writes_over_tls(tls_node: tuple[str, Path]) -> None:
    url, certs = tls_node
    with KVClient(url, ca_file=certs / "ca.pem") as kv:
        assert kv.endpoints == [url]
        kv.set("greeting", "hello")
        assert kv.get("greeting") == "hello"


def test_a_client_without_the_ca_fails_with_a_tls_error(tls_node: tuple[str, Path]) -> None:
    url, _ = tls_node
    with KVClient(url, retry_deadline=5) as kv, pytest.raises(TLSError) as err:
        kv.get("greeting")
    assert err.value.code == "tls"
    assert not err.value.retryable
    assert "certificate" in str(err.value).lower()


def test_admin_routes_need_a_node_certificate(tls_node: tuple[str, Path]) -> None:
    url, certs = tls_node
    ca = certs / "ca.pem"
    for who, name in (("no certificate", None), ("a client certificate", "client")):
        cert = None if name is None else certs / f"{name}.pem"
        key = None if name is None else certs / f"{name}-key.pem"
        with KVClient(url, ca_file=ca, cert_file=cert, key_file=key) as kv:
            resp = kv.request("POST", "/v1/admin/resume_writes")
            assert resp.status == 403, who
            assert json.loads(resp.body)["error"]["code"] == "peer_certificate_required", who
            # The key routes serve every client of the TLS port.
            kv.set("k", "v")
    node_cert, node_key = certs / "n0.pem", certs / "n0-key.pem"
    with KVClient(url, ca_file=ca, cert_file=node_cert, key_file=node_key) as kv:
        assert kv.request("POST", "/v1/admin/resume_writes").status == 200
