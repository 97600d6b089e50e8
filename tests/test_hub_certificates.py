"""What the TLS step, hub_status and the hub's HTTPS service read from a certificate file:
the leaf of a chain, its expiry, and a clear word when there is no certificate in it."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest

from tasks.hub.payload import tls_service


def openssl(*args: str, cwd: Path) -> str:
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def chain(tmp_path) -> Path:
    """key, leaf (3 days), CA (20000 days) in one file, as some offices hand them over."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-out", "k.pem", cwd=tmp_path)
    openssl("req", "-x509", "-key", "k.pem", "-subj", "/CN=ca", "-days", "20000",
            "-out", "ca.pem", cwd=tmp_path)
    openssl("req", "-x509", "-key", "k.pem", "-subj", "/CN=leaf", "-days", "3",
            "-out", "leaf.pem", cwd=tmp_path)
    both = tmp_path / "chain.pem"
    both.write_bytes(b"".join((tmp_path / name).read_bytes()
                              for name in ("k.pem", "leaf.pem", "ca.pem")))
    return both


def test_a_chain_is_read_by_its_leaf_the_certificate_a_listener_presents(chain):
    folder = chain.parent
    openssl("x509", "-in", "leaf.pem", "-outform", "DER", "-out", "leaf.der", cwd=folder)
    assert tls_service.first_certificate(chain.read_bytes()) == \
        (folder / "leaf.der").read_bytes()
    said = openssl("x509", "-in", "leaf.pem", "-noout", "-enddate", cwd=folder)
    expiry = tls_service.certificate_expiry(chain.read_bytes())
    assert said.strip() == f"notAfter={expiry:%b %e %H:%M:%S %Y} GMT"
    assert expiry.tzinfo == dt.timezone.utc
    assert 2.9 < tls_service.days_left(chain.read_bytes()) <= 3
    assert tls_service.days_left(chain.read_bytes(), now=expiry) == 0


@pytest.mark.parametrize("text", [
    b"",
    b"not a certificate\n",
    b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
], ids=["empty", "text", "not-x509", "not-base64"])
def test_a_file_without_a_readable_certificate_says_so(text):
    for read in (tls_service.certificate_expiry, tls_service.first_certificate,
                 tls_service.days_left):
        with pytest.raises(ValueError, match="it holds no readable PEM certificate"):
            read(text)


def test_a_key_alone_is_no_certificate(chain):
    with pytest.raises(ValueError, match="no readable PEM certificate"):
        tls_service.certificate_expiry((chain.parent / "k.pem").read_bytes())
