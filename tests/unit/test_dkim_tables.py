"""OpenDKIM's SigningTable and KeyTable as mailflow reads them (mailflow.signing.keytables), the relaxed body hash
against dkimpy's."""
from __future__ import annotations

import base64
import hashlib
import random

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed

from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.signing import dkim as signing
from mailflow.signing.keytables import KeyTable, SigningTable, keys_from_config, load_private_key, lookup_keys


def test_lookup_order_is_opendkims():
    assert lookup_keys("User@Mail.Example.com") == [
        "user@mail.example.com", "mail.example.com", "user@.example.com", "user@.com", ".example.com", ".com",
        "user@*", "*"]


def test_file_table_exact_keys_and_percent(tmp_path):
    table = tmp_path / "SigningTable"
    table.write_text("# comment\nalice@example.com alicekey\nexample.com domainkey\n.parent.test %\n* fallback\n")
    st = SigningTable.load("file", str(table))
    assert st.key_name("alice@example.com") == "alicekey"
    assert st.key_name("bob@example.com") == "domainkey"
    assert st.key_name("bob@sub.parent.test") == "sub.parent.test"  # % is the From domain
    assert st.key_name("x@elsewhere.test") == "fallback"


def test_refile_table_first_pattern_wins(tmp_path):
    table = tmp_path / "SigningTable"
    table.write_text("*@news.example.com news\n*@*example.com main\n")
    st = SigningTable.load("refile", str(table))
    assert (st.key_name("a@news.example.com"), st.key_name("a@example.com"), st.key_name("a@other.test")) == (
        "news", "main", None)


def pem(key, fmt) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.mark.parametrize("form", ["pkcs1", "pkcs8", "ed25519-pem", "ed25519-seed"])
def test_private_key_forms(form):
    if form.startswith("ed25519"):
        key = ed25519.Ed25519PrivateKey.generate()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        data = base64.b64encode(raw) if form == "ed25519-seed" else pem(key, serialization.PrivateFormat.PKCS8)
        algorithm, private, public = load_private_key(data)
        assert (algorithm, private, len(public)) == ("ed25519-sha256", base64.b64encode(raw), 32)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL if form == "pkcs1" else serialization.PrivateFormat.PKCS8
        algorithm, private, public = load_private_key(pem(key, fmt))
        assert algorithm == "rsa-sha256" and private.startswith(b"-----BEGIN RSA PRIVATE KEY-----")


def test_key_table_relative_paths_and_errors(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "k.pem").write_bytes(pem(key, serialization.PrivateFormat.PKCS8))
    (tmp_path / "KeyTable").write_text("k1 example.com:sel:./k.pem\nk2 %:sel2:./k.pem\n")
    table = KeyTable.load(str(tmp_path / "KeyTable"))
    assert (table.get("k1").domain, table.get("k1").selector) == ("example.com", "sel")
    assert table.get("k2", "From.Test").domain == "from.test" and table.get("nope") is None
    (tmp_path / "KeyTable").write_text("k1 example.com:sel:./missing.pem\n")
    with pytest.raises(ConfigError, match="k1"):
        KeyTable.load(str(tmp_path / "KeyTable"))
    (tmp_path / "KeyTable").write_text("k1 example.com-sel\n")
    with pytest.raises(ConfigError, match="domain:selector:keyfile"):
        KeyTable.load(str(tmp_path / "KeyTable"))


def test_relative_table_paths_are_taken_from_the_config_file(tmp_path):
    (tmp_path / "conf").mkdir()
    config_file = tmp_path / "conf" / "mailflow.toml"
    config_file.write_text('[dkim]\nsigning_table = "refile:tables/SigningTable"\nkey_table = "tables/KeyTable"\n')
    from mailflow.config import load_config

    dkim_config = load_config(config_file).dkim
    assert dkim_config.signing_table == f"refile:{tmp_path}/conf/tables/SigningTable"
    assert dkim_config.key_table == f"file:{tmp_path}/conf/tables/KeyTable"
    assert keys_from_config(config_from_dict({}).dkim) is None


def test_the_streamed_relaxed_body_hash_is_dkimpys():
    rng = random.Random(7)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"\r\n\r\n", b"word", b"  \t ", b"\n", b"\r"]
    for _ in range(500):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        _, parsed = dkim.rfc822_parse(b"From: x\r\n\r\n" + body)
        canonical = signing.BodyHash()
        for i in range(0, len(body), 3):
            canonical.feed(body[i:i + 3])
        assert canonical.digest() == hashlib.sha256(Relaxed.canonicalize_body(parsed)).digest(), body


def test_check_config_reads_the_dkim_tables_and_srs_secrets(tmp_path):
    from typer.testing import CliRunner

    from mailflow.cli import app as cli

    config = tmp_path / "m.toml"
    config.write_text(f'queue_directory = "{tmp_path}/q"\n[dkim]\nsigning_table = "refile:{tmp_path}/ST"\n'
                      f'key_table = "{tmp_path}/KT"\n[srs]\nenabled = true\ndomain = "a.test"\n'
                      f'secret_file = "{tmp_path}/secret"\n')
    (tmp_path / "ST").write_text("*@a.test k\n")
    (tmp_path / "KT").write_text("k a.test:sel:./missing.private\n")
    result = CliRunner().invoke(cli, ["check-config", "-c", str(config)])
    assert result.exit_code == 2
    assert f"{tmp_path}/missing.private: dkim.key_table: key k:" in result.output
    assert f"{tmp_path}/secret: srs.secret_file: cannot read" in result.output
