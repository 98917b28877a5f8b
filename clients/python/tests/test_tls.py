"""The Python client over TLS and mutual TLS (docs/security.md), against a
kvrecalld serving certificates made here with the openssl command."""

import pathlib
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

import kvrecall
from kvrecall import errors
from conftest import TENANTS, Daemon


def _openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def certs():
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (apt-get install openssl)")
    d = pathlib.Path(tempfile.mkdtemp(prefix="kvrecall-tls-"))
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=kvr-test-ca", "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        _openssl(d, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                 f"{name}.key", "-out", f"{name}.csr")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", *ext, "-out", f"{name}.pem")
    _openssl(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=rogue-ca", "-keyout", "rogue-ca.key", "-out", "rogue-ca.pem")
    (d / "tenants").write_text("".join(f"{t} {tok}\n" for t, tok in TENANTS.items()))
    return d


@pytest.fixture(scope="module")
def mtls_daemon(certs):
    d = Daemon([f"--tls_cert_file={certs / 'server.pem'}",
                f"--tls_key_file={certs / 'server.key'}",
                f"--tls_client_ca_file={certs / 'ca.pem'}",
                f"--tenants_file={certs / 'tenants'}"])
    yield d
    assert d.stop() == 0


def _client(daemon, certs, **kw):
    return kvrecall.Client(daemon.address, token=TENANTS["alpha"], deadline_s=5, max_attempts=1,
                           **kw)


def test_mutual_tls_round_trip(mtls_daemon, certs):
    with _client(mtls_daemon, certs, tls_ca=str(certs / "ca.pem"),
                 tls_cert=str(certs / "client.pem"), tls_key=str(certs / "client.key")) as c:
        m = c.register_model("tls-model", num_layers=1, num_q_heads=2, num_kv_heads=1,
                             head_dim=8, dtype="f32", block_tokens=4)
        rng = np.random.default_rng(3)
        kv = rng.standard_normal((1, 2, 1, 8, 8)).astype(np.float32)
        hashes = c.put_sequence(m.model_id, list(range(8)), kv)
        got = c.get_sequence(m.model_id, hashes)
        np.testing.assert_array_equal(got, kv)


@pytest.mark.parametrize("case", ["plaintext", "no_client_cert", "untrusted_server"])
def test_connections_without_the_right_certificates_are_refused(mtls_daemon, certs, case):
    kw = {
        "plaintext": {},
        "no_client_cert": {"tls_ca": str(certs / "ca.pem")},
        "untrusted_server": {"tls_ca": str(certs / "rogue-ca.pem"),
                             "tls_cert": str(certs / "client.pem"),
                             "tls_key": str(certs / "client.key")},
    }[case]
    with _client(mtls_daemon, certs, **kw) as c:
        with pytest.raises(errors.UnavailableError):
            c.list_models()


def test_a_certificate_without_its_key_is_refused_up_front(certs):
    with pytest.raises(ValueError, match="go together"):
        kvrecall.Client("127.0.0.1:1", tls_cert=str(certs / "client.pem"))
