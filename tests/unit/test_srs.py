"""SRS (mailflow.routing.srs): forward and reverse mappings, SRS1 for another forwarder's address, the hash and age
checks, secret rotation."""
from __future__ import annotations

import pytest

from mailflow.config import config_from_dict
from mailflow.errors import ConfigError
from mailflow.routing.srs import DAY, Srs, srs_from_config

NOW = 1_700_000_000.0


def srs(domain="fwd.test", secrets=(b"secret",), now=NOW, max_age=21 * DAY) -> Srs:
    return Srs(domain, secrets, max_age, now=lambda: now)


def test_forward_then_reverse_gives_the_original_sender():
    codec = srs()
    rewritten = codec.forward("Alice@Orig.Test")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=Orig.Test=Alice@fwd.test")
    assert codec.reverse(rewritten) == "Alice@Orig.Test"
    assert codec.reverse(rewritten.upper().replace("@FWD.TEST", "@fwd.test")) is not None  # hash is case-blind


def test_null_sender_own_domain_and_plain_addresses_are_left_alone():
    codec = srs()
    assert codec.forward("") == ""
    assert codec.forward("bob@fwd.test") == "bob@fwd.test"
    assert codec.reverse("bob@fwd.test") is None and codec.reverse("SRS0=x=y=z=w@other.test") is None


def test_a_forged_hash_an_unknown_secret_or_an_old_address_is_refused():
    rewritten = srs().forward("a@orig.test")
    digest = rewritten.split("=")[1]
    assert srs().reverse(rewritten.replace(digest, "AAAA" if digest != "AAAA" else "BBBB")) is None
    assert srs(secrets=(b"other",)).reverse(rewritten) is None
    assert srs(now=NOW + 20 * DAY).reverse(rewritten) == "a@orig.test"
    assert srs(now=NOW + 22 * DAY).reverse(rewritten) is None


def test_old_secrets_still_verify_after_a_rotation():
    rewritten = srs(secrets=(b"old",)).forward("a@orig.test")
    assert srs(secrets=(b"new", b"old")).reverse(rewritten) == "a@orig.test"


def test_another_forwarders_address_becomes_srs1_and_back():
    first = srs("hop1.test", (b"s1",))
    second = srs("hop2.test", (b"s2",))
    srs0 = first.forward("a@orig.test")
    srs1 = second.forward(srs0)
    assert srs1.startswith("SRS1=") and "=hop1.test==" in srs1 and srs1.endswith("@hop2.test")
    assert second.reverse(srs1) == srs0
    assert first.reverse(second.reverse(srs1)) == "a@orig.test"
    third = srs("hop3.test", (b"s3",)).forward(srs1)  # SRS1 again: still names the first hop
    assert "=hop1.test==" in third and srs("hop3.test", (b"s3",)).reverse(third) == srs0


def test_srs_from_config_reads_the_secrets(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("\nfirst\nsecond\n")
    config = config_from_dict({"srs": {"enabled": True, "domain": "Fwd.Test", "secret_file": str(secret)}})
    codec = srs_from_config(config)
    assert codec.domain == "fwd.test"
    rewritten = codec.forward("a@orig.test")  # signed with the first secret; each one verifies
    assert Srs("fwd.test", (b"first",), 21 * DAY).reverse(rewritten) == "a@orig.test"
    assert Srs("fwd.test", (b"second",), 21 * DAY).reverse(rewritten) is None
    assert codec.reverse(Srs("fwd.test", (b"second",), 21 * DAY).forward("b@orig.test")) == "b@orig.test"
    assert srs_from_config(config_from_dict({})) is None
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="no secret"):
        srs_from_config(config)


@pytest.mark.parametrize(("section", "key", "reason"), [
    ({"srs": {"enabled": True, "secret_file": "/x"}}, "srs.domain", "needs a domain"),
    ({"srs": {"enabled": True, "domain": "a.test"}}, "srs.secret_file", "needs a secret_file"),
    ({"arc": {"enabled": True}}, "arc.key", "needs a key"),
    ({"dkim": {"signing_table": "refile:/x"}}, "dkim.key_table", "needs a key_table"),
    ({"dkim": {"signing_table": "db:/x", "key_table": "/k"}}, "dkim.signing_table", "file: and refile: only"),
    ({"deliverability": {"outbound_addresses": ["mx.test"]}}, "deliverability.outbound_addresses", "not an IP"),
])
def test_bad_deliverability_settings_name_the_key(section, key, reason):
    with pytest.raises(ConfigError) as e:
        config_from_dict(section)
    assert e.value.key == key and reason in e.value.reason
