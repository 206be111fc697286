"""mailflow.config.reload: which changed settings wait for a restart, and the configuration a reload puts in force."""
from __future__ import annotations

from mailflow.config import config_from_dict, in_force, restart_needed

RUNNING = {
    "queue_directory": "/var/spool/mailflow",
    "smtpd": {"listen": ["127.0.0.1:25"], "recipient_limit": 100,
              "listeners": [{"address": "127.0.0.1:587", "role": "mta", "overrides": {"recipient_limit": 10}}]},
    "queue": {"queue_run_delay": 60, "incoming_backlog_limit": 5000},
    "log": {"level": "info", "format": "text"},
}


def config(**changes):
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in RUNNING.items()}
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data.setdefault(section, {})[name] = value
        else:
            data[section] = value
    return config_from_dict(data)


def test_nothing_changed_nothing_waits():
    assert restart_needed(config(), config()) == []


def test_what_a_reload_applies_is_not_named():
    new = config(smtpd__recipient_limit=5, queue__queue_run_delay=5, log__level="debug", relay_domains=["x.test"],
                 smtpd__listeners=[{"address": "127.0.0.1:587", "role": "mta", "overrides": {"recipient_limit": 1}}],
                 smtpd__max_sessions=7)
    assert restart_needed(config(), new) == []
    kept = in_force(config(), new, "f.toml")
    assert (kept.smtpd.recipient_limit, kept.queue.queue_run_delay, kept.log.level) == (5, 5.0, "debug")
    assert kept.smtpd.max_sessions == 7  # master.cf's process limit: `postfix reload` applies it
    assert kept.smtpd.listeners[0].overrides == {"recipient_limit": 1}


def test_the_listeners_apply_as_postfix_reload_applies_master_cf():
    """Addresses and roles: a service added, removed or changed in master.cf is applied by `postfix reload` (the
    listeners themselves change in mailflow.stages.smtpd.server)."""
    new = config(smtpd__listen=["127.0.0.1:2525"], smtpd__listeners=[{"address": "127.0.0.1:588", "role": "mta"}])
    assert restart_needed(config(), new) == []
    kept = in_force(config(), new, "f.toml")
    assert kept.smtpd.listen == ("127.0.0.1:2525",)
    assert [(li.address, li.overrides) for li in kept.smtpd.listeners] == [("127.0.0.1:588", {})]
    # a file that drops a listener's certificate together with the listener is put in force whole
    encrypt = {"address": "127.0.0.1:2587", "role": "mta", "overrides": {"tls_security_level": "encrypt"}}
    running = config_from_dict({"smtpd": {"listen": [], "tls_cert_file": "/etc/cert.pem", "listeners": [encrypt]}})
    new = config_from_dict({"smtpd": {"listen": [], "listeners": [{"address": "127.0.0.1:25", "role": "mta"}]}})
    kept = in_force(running, new, "f.toml")
    assert [li.address for li in kept.smtpd.listeners] == ["127.0.0.1:25"] and kept.smtpd.tls_cert_file == ""


def test_what_waits_for_a_restart_is_named_and_kept_as_it_runs():
    new = config(queue_directory="/elsewhere", queue__incoming_backlog_limit=9, log__format="json",
                 dns={"timeout": 1}, http={"listen": ["127.0.0.1:8080"]}, smtpd__recipient_limit=7)
    assert sorted(restart_needed(config(), new)) == [
        "dns.timeout", "http.listen", "log.format", "queue.incoming_backlog_limit", "queue_directory"]
    kept = in_force(config(), new, "f.toml")
    assert kept.queue_directory == "/var/spool/mailflow"
    assert kept.queue.incoming_backlog_limit == 5000 and kept.log.format == "text"
    assert kept.dns.timeout == config().dns.timeout and kept.http.listen == config().http.listen
    assert kept.smtpd.recipient_limit == 7  # the rest applies
