"""`mailflow config show`: postconf's three views of the configuration, each line valid TOML."""
from __future__ import annotations

import tomllib

from mailflow.config import Config, config_from_dict, format_setting, settings_view


def show_settings(config: Config, **view) -> list[str]:
    """The lines `mailflow config show` prints for the view (`defaults`, `changed_only`)."""
    return [format_setting(key, value) for key, value in settings_view(config, **view).items()]


def as_toml(lines: list[str]) -> dict:
    """The lines read back as TOML, with `section.key` as dotted keys."""
    return tomllib.loads("\n".join(lines))


def test_defaults_view_lists_every_setting_and_reads_back_as_the_defaults():
    lines = show_settings(Config(), defaults=True)
    assert config_from_dict(as_toml(lines)) == Config()
    assert 'smtpd.listen = ["127.0.0.1:2525"]' in lines
    assert "queue.maximal_queue_lifetime = 432000" in lines
    assert "smtpd.tls_loglevel = 0" in lines and "smtp.tls_loglevel = 0" in lines
    assert "soft_bounce = false" in lines and "relocated_maps = []" in lines


def test_the_safety_net_and_relocated_maps_show_when_set():
    config = config_from_dict({"soft_bounce": True, "relocated_maps": ["inline:{a@b.test=c@d.test}"]})
    assert show_settings(config, changed_only=True) == ['relocated_maps = ["inline:{a@b.test=c@d.test}"]',
                                                        "soft_bounce = true"]


def test_changed_view_shows_only_what_differs_from_the_defaults():
    config = config_from_dict({"relay_domains": ["relay.test"], "queue": {"queue_run_delay": "1s"},
                               "smtpd": {"listen": ["127.0.0.1:2525"]}})  # the last equals the default
    assert show_settings(config, changed_only=True) == ['relay_domains = ["relay.test"]',
                                                        "queue.queue_run_delay = 1"]


def test_effective_view_reads_back_as_the_same_config():
    config = config_from_dict({"myhostname": "mx.example.test", "mynetworks": [],
                               "queue": {"transport_concurrency_limit": {"smtp": 7}},
                               "smtpd": {"banner": 'say "hi"'}})
    assert config_from_dict(as_toml(show_settings(config))) == config


def test_a_table_key_toml_cannot_write_bare_is_quoted():
    config = config_from_dict({"smtpd": {"restriction_classes": {"from.partners": ["permit"]},
                                         "recipient_restrictions": ["from.partners"]}})
    lines = show_settings(config, changed_only=True)
    assert 'smtpd.restriction_classes = {"from.partners" = ["permit"]}' in lines
    assert config_from_dict(as_toml(show_settings(config))) == config
