"""The [smtp] settings of the SMTP client: defaults as Postfix has them, and what is refused."""
from __future__ import annotations

import pytest

from mailflow.config import SmtpConfig, config_from_dict
from mailflow.errors import ConfigError


def test_defaults():
    c = SmtpConfig()
    assert (c.tls_security_level, c.tls_policy_maps, c.tls_ca_file) == ("may", (), "")
    assert (c.sasl_password_maps, c.sasl_tls_required) == ((), True)
    assert (c.connect_timeout, c.helo_timeout, c.command_timeout, c.data_timeout) == (30, 300, 300, 600)
    assert (c.connection_cache_time_limit, c.connection_reuse_count_limit, c.connection_reuse_time_limit) == (
        2, 100, 300)


@pytest.mark.parametrize(("smtp", "key", "reason"), [
    ({"tls_security_level": "fingerprint"}, "smtp.tls_security_level", "Input should be"),
    ({"tls_policy_maps": ["hash:/etc/postfix/tls_policy"]}, "smtp.tls_policy_maps", "is not a lookup table"),
    ({"sasl_password_maps": ["/etc/sasl_passwd"]}, "smtp.sasl_password_maps", "is not a lookup table"),
    ({"tls_key_file": "/etc/key.pem"}, "smtp.tls_key_file", "needs tls_cert_file"),
    ({"connection_reuse_count_limit": -1}, "smtp.connection_reuse_count_limit", "greater than or equal to 0"),
    ({"connection_cache_time_limit": "soon"}, "smtp.connection_cache_time_limit", "is not a duration"),
])
def test_bad_settings_name_the_key(smtp, key, reason):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"smtp": smtp})
    assert e.value.key == key
    assert reason in e.value.reason


def test_a_full_client_setup_loads():
    c = config_from_dict({"smtp": {
        "tls_security_level": "verify", "tls_policy_maps": ["texthash:/etc/mailflow/tls_policy"],
        "tls_ca_file": "/etc/ssl/ca.pem", "tls_cert_file": "/etc/ssl/client.pem", "tls_key_file": "/etc/ssl/key.pem",
        "sasl_password_maps": ["inline:{ {[relay.example]:587 = user:pw} }"], "sasl_tls_required": False,
        "connection_cache_time_limit": "0s", "helo_timeout": "1m",
    }}).smtp
    assert (c.tls_security_level, c.helo_timeout, c.connection_cache_time_limit) == ("verify", 60, 0)
