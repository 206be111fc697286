"""[smtp.services.NAME] and [lmtp.services.NAME]: named SMTP/LMTP client services (master.cf's `smtp-amavis unix …
smtp -o …`), each a transport of its own name with its section's settings but the keys it sets, validated as the
section's; an unknown key or a name another transport has is refused naming the file and the key."""
from __future__ import annotations

import pytest


from mailflow.config import config_from_dict, load_config
from mailflow.config.reload import in_force
from mailflow.config.show import flat_settings, format_setting, settings_view
from mailflow.errors import ConfigError
from mailflow.tables.check import table_problems

AMAVIS = {"smtp": {"helo_name": "out.example", "tls_security_level": "encrypt",
                   "services": {"smtp-amavis": {"data_timeout": "20m", "tls_security_level": "none"}}},
          "lmtp": {"services": {"dovecot": {"port": 2424}}}}


def test_a_service_takes_its_sections_settings_but_the_keys_it_sets():
    config = config_from_dict(AMAVIS)
    amavis = config.smtp.for_service("smtp-amavis")
    assert (amavis.data_timeout, amavis.tls_security_level, amavis.helo_name) == (1200.0, "none", "out.example")
    assert config.smtp.tls_security_level == "encrypt" and config.smtp.data_timeout == 600.0
    assert config.lmtp.for_service("dovecot").port == 2424 and config.lmtp.port == 24
    assert {"smtp-amavis", "dovecot"} <= config.defined_transports()


def test_relay_may_be_an_smtp_service_of_its_own_as_in_postfix_s_master_cf():
    """Postfix's `relay` is an smtp service of master.cf (`relay unix … smtp -o smtp_tls_security_level=encrypt`):
    [smtp.services.relay] gives mailflow's relay transport its own settings (without it relay is [smtp]'s)."""
    config = config_from_dict({"smtp": {"services": {"relay": {"tls_security_level": "encrypt"}}}})
    assert config.smtp.for_service("relay").tls_security_level == "encrypt"


def test_every_smtp_client_is_listed_once_with_where_its_settings_are():
    """Config.smtp_clients, the one rule the server's transports, its descriptor count and `address` share: smtp and
    relay are [smtp]'s unless an [smtp.services.relay] takes relay's place; each service is a client of its own."""
    assert [(name, where) for name, where, _ in config_from_dict({}).smtp_clients()] == [
        ("smtp", "smtp"), ("relay", "smtp")]
    config = config_from_dict({"smtp": {**AMAVIS["smtp"], "services": {
        **AMAVIS["smtp"]["services"], "relay": {"tls_security_level": "dane"}}}})
    assert [(name, where, settings.tls_security_level) for name, where, settings in config.smtp_clients()] == [
        ("smtp", "smtp", "encrypt"), ("relay", "smtp.services.relay", "dane"),
        ("smtp-amavis", "smtp.services.smtp-amavis", "none")]


def test_per_transport_queue_tables_and_local_may_name_a_service():
    config = config_from_dict({**AMAVIS, "queue": {"transport_concurrency_limit": {"smtp-amavis": 2},
                                                   "transport_destination_rate_delay": {"dovecot": "1s"},
                                                   "transport_destination_recipient_limit": {"smtp-amavis": 1}},
                               "local": {"mailbox_transport": "dovecot:[127.0.0.1]"}})
    assert config.queue.transport_concurrency_limit == {"smtp-amavis": 2}


@pytest.mark.parametrize("document, key, reason", [
    ({"smtp": {"services": {"a": {"helo_nmae": "x"}}}}, "smtp.services.a.helo_nmae", "unknown setting"),
    ({"lmtp": {"services": {"a": {"helo_name": "x"}}}}, "lmtp.services.a.helo_name", "unknown setting"),
    ({"smtp": {"services": {"a": {"services": {}}}}}, "smtp.services.a.services", "unknown setting"),
    ({"smtp": {"services": {"a": {"port": 0}}}}, "smtp.services.a.port", "greater than or equal to 1"),
    ({"smtp": {"services": {"a": {"tls_security_level": "maybe"}}}}, "smtp.services.a.tls_security_level", "'may'"),
    ({"smtp": {"services": {"a": {"reply_filter": ["sqlite:/x.db"]}}}}, "smtp.services.a.reply_filter", "may wait"),
    ({"smtp": {"services": {"a": {"tls_key_file": "/k.pem"}}}}, "smtp.services.a.tls_key_file", "needs tls_cert"),
    ({"smtp": {"services": {"smtp": {}}}}, "smtp.services", "'smtp' is the name of a built-in transport"),
    ({"smtp": {"services": {"virtual": {}}}}, "smtp.services", "'virtual' is the name of a built-in transport"),
    ({"lmtp": {"services": {"relay": {}}}}, "lmtp.services", "'relay' is the name of a built-in transport"),
    ({"lmtp": {"services": {"local": {}}}}, "lmtp.services", "'local' is the name of a built-in transport"),
    ({"smtp": {"services": {"a:b": {}}}}, "smtp.services", "not a transport name"),
    ({"smtp": {"services": {"slow": {}}}, "pipe": {"slow": {"argv": ["/bin/true"]}}}, "(top level)",
     "smtp.services.slow: 'slow' is also [pipe.slow]"),
    ({"smtp": {"services": {"x": {}}}, "lmtp": {"services": {"x": {}}}}, "(top level)",
     "lmtp.services.x: 'x' is also [smtp.services.x]"),
    ({"queue": {"transport_concurrency_limit": {"smtp-amavis": 2}}}, "(top level)",
     "queue.transport_concurrency_limit: 'smtp-amavis' is not a transport"),
])
def test_a_bad_service_is_refused_naming_the_file_and_key(document, key, reason):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(document, "mailflow.toml")
    assert (caught.value.file, caught.value.key) == ("mailflow.toml", key)
    assert reason in caught.value.reason


def test_a_service_keeps_only_what_it_sets_through_a_reload_and_config_show_shows_that():
    """Dumped and validated again (a reload's `in_force`), a service does not turn [smtp]'s values of the keys it
    left alone into its own: a later change of [smtp] reaches it."""
    config = config_from_dict(AMAVIS)
    again = in_force(config, config, "mailflow.toml")
    assert again.smtp.services == config.smtp.services
    changed = config_from_dict({**again.model_dump(), "smtp": {**again.model_dump()["smtp"], "helo_name": "new"}})
    assert changed.smtp.for_service("smtp-amavis").helo_name == "new"
    assert ('smtp.services = {smtp-amavis = {data_timeout = 1200, tls_security_level = "none"}}'
            == format_setting("smtp.services", settings_view(config, changed_only=True)["smtp.services"]))


def test_a_services_relative_table_paths_are_taken_from_the_files_directory(tmp_path):
    (tmp_path / "mailflow.toml").write_text('[smtp.services.x]\ngeneric_maps = ["texthash:generic"]\n')
    config = load_config(tmp_path / "mailflow.toml")
    assert config.smtp.for_service("x").generic_maps == (f"texthash:{tmp_path}/generic",)


def test_check_config_names_a_services_table_that_cannot_answer(tmp_path):
    """`mailflow check-config` and a reload read each file-backed table a service names, as [smtp]'s."""
    (tmp_path / "mailflow.toml").write_text('[smtp.services.x]\ngeneric_maps = ["texthash:missing"]\n')
    [problem] = table_problems(flat_settings(load_config(tmp_path / "mailflow.toml")), "mailflow.toml")
    assert (problem.file, problem.key) == ("mailflow.toml", "smtp.services.x.generic_maps")


def test_check_config_names_postscreens_tables_that_cannot_answer(tmp_path):
    """postscreen_dnsbl_reply_map, access_list and allowlist_interfaces tables are read by check-config and a reload
    (Postfix's postscreen exits at start on a reply map it cannot open), in [smtpd.postscreen] and an override."""
    (tmp_path / "mailflow.toml").write_text(
        '[smtpd.postscreen]\nenable = true\ndnsbl_reply_map = "texthash:missing"\n'
        'access_list = ["permit_mynetworks", "cidr:missing.cidr"]\nallowlist_interfaces = ["cidr:missing2.cidr"]\n'
        '[[smtpd.listeners]]\naddress = "127.0.0.1:2525"\noverrides.postscreen.dnsbl_reply_map = "texthash:gone"\n')
    problems = table_problems(flat_settings(load_config(tmp_path / "mailflow.toml")), "mailflow.toml")
    assert sorted(problem.key for problem in problems) == [
        "smtpd.listeners[0].overrides.postscreen.dnsbl_reply_map", "smtpd.postscreen.access_list",
        "smtpd.postscreen.allowlist_interfaces", "smtpd.postscreen.dnsbl_reply_map"], problems
