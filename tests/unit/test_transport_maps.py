"""transport_maps precedence (transport(5) search order) and relay_recipient_maps."""
from __future__ import annotations

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass
from mailflow.routing.rewrite import Rewriter, transport_keys

MAP = ("inline:{ user@sub.example.test=lmtp:[127.0.0.1]:24, sub.example.test=smtp:[10.0.0.1]:587,"
       " .example.test=relay:, other.test=:[gw.other.test], *=discard: }")
BASE = {"myhostname": "mx.local.test", "mydestination": ["local.test"], "relay_domains": ["relay.test"],
        "relayhost": "[relayhost.test]:25"}


def rewriter(**extra) -> Rewriter:
    return Rewriter(config_from_dict({**BASE, **extra}))


@pytest.mark.parametrize("addr, transport, nexthop", [
    ("user@sub.example.test", "lmtp", "[127.0.0.1]:24"),           # the whole address first
    ("user+tag@sub.example.test", "lmtp", "[127.0.0.1]:24"),       # then without the extension
    ("other@sub.example.test", "smtp", "[10.0.0.1]:587"),          # then the domain
    ("x@deep.sub.example.test", "relay", "deep.sub.example.test"),  # a parent domain; no nexthop: the domain
    ("x@example.test", "discard", "example.test"),                  # '.example.test' is for subdomains only
    ("x@other.test", "smtp", "[gw.other.test]"),                   # empty transport keeps the class's
    ("alice@local.test", "discard", "local.test"),                 # '*' catches everything else, local too
    ("USER@SUB.Example.TEST", "lmtp", "[127.0.0.1]:24"),           # case folded
])
def test_transport_maps_search_order(addr, transport, nexthop):
    res = rewriter(transport_maps=[MAP]).resolve(addr)
    assert (res.transport, res.nexthop) == (transport, nexthop)


def test_without_transport_maps_the_class_decides():
    res = rewriter().resolve("x@relay.test")
    assert (res.address_class, res.transport, res.nexthop) == (AddressClass.RELAY, "relay", "[relayhost.test]:25")


def test_each_key_is_asked_of_every_table_before_the_next_key():
    tables = ["inline:{relay.test=first:}", "inline:{x@relay.test=second:}"]
    assert rewriter(transport_maps=tables).resolve("x@relay.test").transport == "second"
    assert rewriter(transport_maps=tables).resolve("y@relay.test").transport == "first"


def test_transport_keys():
    assert transport_keys("u+t@a.b.c", "+") == (["u+t@a.b.c", "u@a.b.c", "a.b.c", ".b.c", ".c", "*"], (0,))


def test_transport_keys_split_the_extension_off_the_internal_form_and_ask_both_forms():
    """Postfix's transport.c asks mail_addr_find in its legacy form: quoted, then internal; the extension is split
    off the internal form (`"t 2+e"@x.test` asks `"t 2"@x.test`, not `"t 2@x.test`: review of hunt-quote #1)."""
    assert transport_keys('"t 2+e"@x.test', "+") == (
        ['"t 2+e"@x.test', "t 2+e@x.test", '"t 2"@x.test', "t 2@x.test", "x.test", ".test", "*"], (0, 1))
    assert transport_keys('"t.1."@x.test', "+")[0][:2] == ['"t.1."@x.test', "t.1.@x.test"]


@pytest.mark.parametrize("addr, value", [('"t 2+e"@x.test', "quoted:"), ('"t.1."@x.test', "internal:"),
                                         ('"t.1.+e"@x.test', "internal:")])
def test_transport_maps_find_quoted_and_internal_keys(addr, value):
    tables = ['inline:{ {"t 2"@x.test = quoted:}, {t.1.@x.test = internal:} }']
    assert rewriter(transport_maps=tables).resolve(addr).transport == value.rstrip(":")


def test_a_failing_transport_table_raises_retry_never_not_found():
    with pytest.raises(LookupRetry):
        rewriter(transport_maps=["fail:down"]).resolve("x@relay.test")


def test_relay_recipient_maps():
    rw = rewriter(relay_recipient_maps=["inline:{known@relay.test=OK, @catchall.relay.test=OK}"])
    assert rw.is_known_relay("known@relay.test") and rw.is_known_relay("Known+tag@relay.test")
    assert not rw.is_known_relay("unknown@relay.test")
    assert rewriter().is_known_relay("anyone@relay.test")
    with pytest.raises(LookupRetry):
        rewriter(relay_recipient_maps=["fail:down"]).is_known_relay("x@relay.test")


def test_unknown_table_type_is_a_config_error_naming_the_setting():
    from mailflow.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        config_from_dict({"transport_maps": ["hash:/etc/postfix/transport"]}, "m.toml")
    assert str(err.value).startswith("m.toml: transport_maps: 'hash:/etc/postfix/transport' is not a lookup table")


def run_cli(*args: str):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "mailflow", *args], capture_output=True, text=True, timeout=30)


def test_mailflow_address_explains_each_step(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('mydestination = ["local.test"]\nrelay_domains = ["relay.test"]\n'
                   'transport_maps = ["inline:{relay.test=smtp:[127.0.0.1]:2526}"]\n'
                   'relay_recipient_maps = ["inline:{known@relay.test=OK}"]\n'
                   'local_recipient_maps = ["inline:{alice=ok}"]\n')
    result = run_cli("address", "-c", str(cfg), "known+tag@relay.test", "nobody@local.test")
    assert result.returncode == 0, result.stderr
    first, second = [dict(line.strip().split(":", 1) for line in block.splitlines())
                     for block in result.stdout.strip().split("\n\n")]
    assert first["class"].strip() == "relay (domain in relay_domains)"
    assert first["rcpt"].strip() == "accepted"
    assert first["transport_maps"].strip().endswith("relay.test -> smtp:[127.0.0.1]:2526")
    assert (first["transport"].strip(), first["nexthop"].strip()) == ("smtp", "[127.0.0.1]:2526")
    assert second["rcpt"].strip() == str(status.user_unknown("nobody@local.test"))
    assert second["refused"].strip() == '5.1.1 unknown user: "nobody"'


def test_mailflow_address_masks_control_characters_as_the_queue_tools_do(tmp_path):
    """An escape sequence or a line break in an address was printed raw: a terminal took it, and one step's line
    became two. Each is `?`, as mailq and postcat show them."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('mydestination = ["local.test"]\n')
    result = run_cli("address", "-c", str(cfg), "a\x1b[31mb@remote.test", "x\ny@remote.test")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "a?[31mb@remote.test" in result.stdout
    first, second = result.stdout.strip().split("\n\n")
    assert first.splitlines()[0].split() == ["address:", "a?[31mb@remote.test"]
    assert second.splitlines()[0].split() == ["address:", "x?y@remote.test"]
    assert all(":" in line for line in second.splitlines())  # (no line cut in two)


def test_mailflow_address_exits_75_when_a_table_cannot_answer(tmp_path):
    cfg = tmp_path / "m.toml"
    cfg.write_text('transport_maps = ["fail:down"]\n')
    result = run_cli("address", "-c", str(cfg), "x@example.test")
    assert result.returncode == 75 and "fail:down" in result.stderr


def test_mailflow_address_masks_control_characters_in_the_warning_of_a_failed_lookup(tmp_path):
    """The warning logged for a lookup that failed went to stderr through Python's last-resort handler, the
    address's escape sequence raw; it is the command's warning now, printable."""
    cfg = tmp_path / "m.toml"
    cfg.write_text('transport_maps = ["fail:down"]\n')
    result = run_cli("address", "-c", str(cfg), "a\x1b[31mb@remote.test")
    assert result.returncode == 75 and "\x1b" not in result.stderr, result.stderr
    assert result.stderr.splitlines()[0] == ("mailflow address: warning: smtpd: Recipient address "
                                             "<a?[31mb@remote.test>: table fail:down is a fail: table; every lookup "
                                             "fails")


def test_virtual_mailbox_class_sits_between_local_and_relay():
    rw = rewriter(virtual_mailbox_domains=["virtual.test", "relay.test"],
                  virtual_mailbox_maps=["inline:{a@virtual.test=virtual.test/a/, @catch.test=catch/}"])
    res = rw.resolve("a+x@virtual.test")
    assert (res.address_class, res.transport, res.nexthop) == (AddressClass.VIRTUAL_MAILBOX, "virtual", "virtual.test")
    assert rw.classify("x@relay.test") is AddressClass.VIRTUAL_MAILBOX  # listed in both: virtual wins, as in Postfix
    assert rw.classify("x@local.test") is AddressClass.LOCAL
    assert rw.virtual_mailbox("A+x@Virtual.Test") == "virtual.test/a/"
    assert rw.virtual_mailbox("b@virtual.test") is None
    assert rw.virtual_mailbox("anyone@catch.test") == "catch/"


def test_mailflow_address_shows_the_tls_policy_of_the_relayhost(tmp_path):
    from typer.testing import CliRunner

    from mailflow.cli import app as cli

    config = tmp_path / "m.toml"
    config.write_text('relayhost = "[192.0.2.1]"\n')
    result = CliRunner().invoke(cli, ["address", "-c", str(config), "x@remote.test"])
    tls = [line.split(":", 1)[1].strip() for line in result.output.splitlines() if line.strip().startswith("tls:")]
    assert tls == ["may (smtp.tls_security_level)"], result.output  # not "'[192.0.2.1]  (relayhost)' is not ..."


def test_mailflow_address_shows_a_client_service_s_own_tls_policy_and_fallback_relays(tmp_path):
    """A transport that is an [smtp.services.NAME] is shown with that service's settings, not [smtp]'s."""
    from typer.testing import CliRunner

    from mailflow.cli import app as cli

    config = tmp_path / "m.toml"
    config.write_text('transport_maps = ["inline:{ {filter.test=amavis:[192.0.2.1]:10024} }"]\n'
                      '[smtp]\ntls_security_level = "encrypt"\n'
                      '[smtp.services.amavis]\ntls_security_level = "none"\nfallback_relay = ["[192.0.2.9]"]\n')
    result = CliRunner().invoke(cli, ["address", "-c", str(config), "x@filter.test", "x@remote.test"])
    lines = [line.strip() for line in result.output.splitlines()]
    tls = [line.split(":", 1)[1].strip() for line in lines if line.startswith("tls:")]
    assert tls == ["none (smtp.services.amavis.tls_security_level)", "encrypt (smtp.tls_security_level)"], \
        result.output
    assert [line.split(":", 1)[1].strip() for line in lines if line.startswith("fallback:")] == [
        "[192.0.2.9]  (smtp.services.amavis.fallback_relay: for the recipients the next hop defers or cannot be "
        "reached for)"], result.output


def test_mailflow_address_names_smtp_s_key_for_a_value_a_service_inherits(tmp_path):
    """A service that sets only helo_name takes [smtp]'s TLS level and fallback relays: `mailflow address` names
    smtp.tls_security_level and smtp.fallback_relay, not service keys that are not set."""
    from typer.testing import CliRunner

    from mailflow.cli import app as cli

    config = tmp_path / "m.toml"
    config.write_text('transport_maps = ["inline:{ {bulk.test=ip2:[192.0.2.1]} }"]\n'
                      '[smtp]\ntls_security_level = "encrypt"\nfallback_relay = ["[192.0.2.9]"]\n'
                      '[smtp.services.ip2]\nhelo_name = "mx2.example.test"\n')
    result = CliRunner().invoke(cli, ["address", "-c", str(config), "x@bulk.test"])
    lines = [line.strip() for line in result.output.splitlines()]
    assert "tls:         encrypt (smtp.tls_security_level)" in lines, result.output
    assert [line.split(":", 1)[1].strip() for line in lines if line.startswith("fallback:")] == [
        "[192.0.2.9]  (smtp.fallback_relay: for the recipients the next hop defers or cannot be reached for)"], \
        result.output


def test_mailflow_address_names_the_fallback_relays_of_smtp_mail_only():
    rw = rewriter(mydestination=["local.test"], smtp={"fallback_relay": ["[192.0.2.7]:2525", "backup.test"]})
    steps = dict(rw.explain("x@remote.test"))
    assert steps["fallback"].startswith("[192.0.2.7]:2525, backup.test  (smtp.fallback_relay")
    assert "fallback" not in dict(rw.explain("x@local.test"))


@pytest.mark.parametrize("table, transport", [
    ("inline:{ {xn--bcher-kva.test = special:}, {* = star:} }", "special"),   # the A-label key before `*`
    ("inline:{ {.xn--bcher-kva.test = parent:}, {* = star:} }", "parent"),   # a parent in A-labels too
    ("inline:{ {bücher.test = u:}, {xn--bcher-kva.test = a:} }", "u"),       # the key as written first
])
def test_an_a_label_key_is_asked_next_to_its_u_label_key(table, transport):
    """(review of hunt-finalB #5: the A-label keys came after `*`, and a pattern table saw only the U-label
    address)"""
    assert rewriter(transport_maps=[table]).resolve("bob@sub.bücher.test" if "parent" in transport
                                                    else "bob@bücher.test").transport == transport


def test_a_pattern_table_sees_the_address_in_a_labels_too(tmp_path):
    """(after the address as written: `/^bob@/` would match that first)"""
    (tmp_path / "transport.re").write_text("/^bob@xn--bcher-kva\\.test$/ special:\n/^ann@/ other:\n")
    assert rewriter(transport_maps=[f"regexp:{tmp_path}/transport.re"]).resolve("bob@bücher.test").transport == (
        "special")
