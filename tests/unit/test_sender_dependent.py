"""Sender-dependent routing (Postfix's sender_dependent_relayhost_maps and sender_dependent_default_transport_maps):
which classes they reach, their keys, DUNNO, the null sender, and what overrules them (trivial-rewrite's resolve.c)."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mailflow.cli import app as cli
from mailflow.config import config_from_dict
from mailflow.errors import ConfigError, LookupRetry
from mailflow.model import AddressClass
from mailflow.routing.rewrite import Rewriter
from mailflow.routing.router import Route, Router

RELAYHOSTS = ("inline:{ {alice@acct.test = [10.0.0.2]:587}, {@acct.test = [10.0.0.3]}, {<> = [10.0.0.4]},"
              " {dunno@acct.test = DUNNO}, {empty@acct.test = }, {root = [10.0.0.5]} }")
TRANSPORTS = "inline:{ {@special.test = relay:[10.0.0.9]}, {@lmtp.test = lmtp:}, {x@special.test = dunno} }"
BASE = {"myhostname": "mx.local.test", "mydestination": ["local.test"], "relay_domains": ["relay.test"],
        "virtual_mailbox_domains": ["virtual.test"], "relayhost": "[10.0.0.1]",
        "sender_dependent_relayhost_maps": [RELAYHOSTS], "sender_dependent_default_transport_maps": [TRANSPORTS]}


def rewriter(**extra) -> Rewriter:
    return Rewriter(config_from_dict({**BASE, **extra}))


def hop(rw: Rewriter, rcpt: str, sender: str | None) -> tuple[str, str]:
    res = rw.resolve(rcpt, sender)
    return res.transport, res.nexthop


@pytest.mark.parametrize("sender, expected", [
    ("alice@acct.test", ("smtp", "[10.0.0.2]:587")),       # the whole address first
    ("alice+tag@acct.test", ("smtp", "[10.0.0.2]:587")),   # then without its extension
    ("bob@acct.test", ("smtp", "[10.0.0.3]")),             # then @domain
    ("Bob@ACCT.test", ("smtp", "[10.0.0.3]")),             # case folded, as the table's keys are
    ("", ("smtp", "[10.0.0.4]")),                          # the null sender: empty_address_relayhost_maps_lookup_key
    ("dunno@acct.test", ("smtp", "[10.0.0.1]")),           # DUNNO ends the search: relayhost
    ("empty@acct.test", ("smtp", "[10.0.0.1]")),           # an empty value too (Postfix warns and ignores it)
    ("root@mx.local.test", ("smtp", "[10.0.0.5]")),        # a bare user key, for this host's own domains only
    ("root@elsewhere.test", ("smtp", "[10.0.0.1]")),
    ("x@special.test", ("smtp", "[10.0.0.1]")),            # dunno, any case: default_transport
    ("y@special.test", ("relay", "[10.0.0.9]")),           # a transport's own nexthop beats every relayhost
    ("y@lmtp.test", ("lmtp", "[10.0.0.1]")),               # a transport without one keeps the relayhost
    (None, ("smtp", "[10.0.0.1]")),                        # no sender known (smtpd's checks): nothing looked up
])
def test_default_class_by_sender(sender, expected):
    assert hop(rewriter(), "x@remote.test", sender) == expected


def test_relay_class_takes_the_sender_relayhost_but_not_the_sender_transport():
    rw = rewriter()
    assert hop(rw, "x@relay.test", "bob@acct.test") == ("relay", "[10.0.0.3]")
    assert hop(rw, "x@relay.test", "y@special.test") == ("relay", "[10.0.0.1]")


@pytest.mark.parametrize("rcpt, klass", [("alice@local.test", AddressClass.LOCAL),
                                         ("a@virtual.test", AddressClass.VIRTUAL_MAILBOX)])
def test_local_and_virtual_mail_ignore_the_sender(rcpt, klass):
    rw = rewriter()
    assert rw.resolve(rcpt, "bob@acct.test") == rw.resolve(rcpt)
    assert rw.resolve(rcpt).address_class is klass


def test_transport_maps_and_a_class_transport_nexthop_overrule_the_sender():
    rw = rewriter(transport_maps=["inline:{tm.test=smtp:[10.0.0.8], bare.test=smtp:}"])
    assert hop(rw, "x@tm.test", "bob@acct.test") == ("smtp", "[10.0.0.8]")
    assert hop(rw, "x@bare.test", "bob@acct.test") == ("smtp", "bare.test")  # `smtp:`: the recipient domain
    assert hop(rewriter(relay_transport="smtp:[10.0.0.7]"), "x@relay.test", "bob@acct.test") == ("smtp", "[10.0.0.7]")


def test_the_null_sender_keys_are_settings():
    rw = rewriter(empty_address_relayhost_maps_lookup_key="bounces@acct.test",
                  empty_address_default_transport_maps_lookup_key="@special.test")
    assert hop(rw, "x@remote.test", "") == ("relay", "[10.0.0.9]")  # the transport's nexthop wins over the relay
    assert hop(rewriter(sender_dependent_default_transport_maps=[],
                        empty_address_relayhost_maps_lookup_key="bounces@acct.test"),
               "x@remote.test", "") == ("smtp", "[10.0.0.3]")  # searched as an address is: @acct.test


def test_a_sender_table_that_cannot_answer_raises_retry():
    with pytest.raises(LookupRetry):
        rewriter(sender_dependent_relayhost_maps=["fail:down"]).resolve("x@remote.test", "a@b.test")


def test_without_the_tables_the_sender_costs_no_lookup():
    rw = rewriter(sender_dependent_relayhost_maps=[], sender_dependent_default_transport_maps=[])
    first = rw.resolve("x@remote.test", "bob@acct.test")
    assert rw.resolve("x@remote.test", "carol@acct.test") is first  # the class's cached answer itself


def test_an_empty_null_sender_key_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"empty_address_relayhost_maps_lookup_key": ""}, "m.toml")
    assert str(err.value).startswith("m.toml: empty_address_relayhost_maps_lookup_key:")


def test_router_forwards_keep_the_sender_unless_a_list_owner_sends():
    router = Router(config_from_dict({**BASE, "alias_maps": [
        "inline:{ {fwd = x@remote.test}, {list = y@remote.test}, {owner-list = z@acct.test} }"],
        "sender_dependent_relayhost_maps": ["inline:{ {owner-list@mx.local.test = [10.0.0.6]} }", RELAYHOSTS]}))
    assert router.route("fwd@local.test", "alice@acct.test") == [Route("x@remote.test", "smtp", "[10.0.0.2]:587")]
    # a list with an owner- alias sends as owner-list@myorigin (local(8))
    assert router.route("list@local.test", "alice@acct.test") == [Route("y@remote.test", "smtp", "[10.0.0.6]")]


def test_mailflow_address_routes_by_a_given_sender(tmp_path):
    config = tmp_path / "m.toml"
    config.write_text('myhostname = "mx.local.test"\nrelayhost = "[10.0.0.1]"\n'
                      'sender_canonical_maps = ["inline:{ {alice = alice@acct.test} }"]\n'
                      f'sender_dependent_relayhost_maps = ["{RELAYHOSTS}"]\n')
    result = CliRunner().invoke(cli, ["address", "-c", str(config), "-f", "alice", "x@remote.test"])
    assert result.exit_code == 0, result.output
    shown = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in result.output.splitlines()}
    assert shown["sender"] == "<alice> -> <alice@acct.test> (as queued)"
    assert shown["sender_dependent_relayhost"].endswith("alice@acct.test -> [10.0.0.2]:587")
    assert shown["nexthop"] == "[10.0.0.2]:587"
    null = CliRunner().invoke(cli, ["address", "-c", str(config), "-f", "<>", "x@remote.test"])
    assert "nexthop:     [10.0.0.4]" in null.output, null.output



def test_an_empty_value_is_ignored_with_a_warning_once_a_lookup(caplog):
    rw, memo = rewriter(), {}
    assert hop(rw, "a@remote.test", "empty@acct.test") == ("smtp", "[10.0.0.1]")
    for rcpt in ("b@remote.test", "c@relay.test"):  # one message's other recipients: no lookup, no warning again
        rw.resolve(rcpt, "empty@acct.test", memo)
    assert [r.getMessage() for r in caplog.records] == [
        "sender_dependent_relayhost_maps: ignoring null lookup result for empty@acct.test"] * 2
