"""smtpd restriction lists evaluated on their own: real config, rewriter, tables and a StaticResolver; the
session is a plain `Facts` value. Replies are compared with `mailflow.status`."""
from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import tracemalloc

import pytest

from mailflow import status
from mailflow.config import config_from_dict
from mailflow.dns import MX, StaticResolver
from mailflow.errors import ConfigError
from mailflow.restriction_vocabulary import PERMITTED, relay_guard
from mailflow.routing.addressmap import AddressMapper
from mailflow.routing.rewrite import Rewriter
from mailflow.stages.smtpd.policy import PolicyClient, PolicyError, encode_request
from mailflow.stages.smtpd.restrictions import (Facts, Restrictions, address_access_keys,
                                                address_access_search,
                                                client_full_keys, client_keys, domain_keys)
from tests.support import SmtpClient, free_port

OUTSIDER = "203.0.113.9"
BASE = {
    "myhostname": "mx.mailflow.test",
    "mydestination": ["local.test"],
    "relay_domains": ["relay.test"],
    "mynetworks": ["192.0.2.0/24"],
    "local_recipient_maps": ["inline:{alice=ok}"],
}
RESOLVER = StaticResolver(
    mx={"mx.example": [MX(10, "mail.mx.example")], "nullmx.example": [MX(0, ".")]},
    addresses={"a-only.example": ["198.51.100.1"], "9.113.0.203.bl.test": ["127.0.0.2"]},
)


def restrictions(resolver=RESOLVER, **smtpd) -> Restrictions:
    config = config_from_dict({**BASE, "smtpd": smtpd})
    rewriter = Rewriter(config)
    return Restrictions(config, config.smtpd, rewriter, AddressMapper(config, rewriter), resolver)


def facts(rcpt: str = "alice@local.test", **kw) -> Facts:
    kw.setdefault("client_addr", OUTSIDER)
    kw.setdefault("sender", "s@remote.example")
    kw.setdefault("helo", "client.remote.example")
    return Facts(recipient=rcpt, **kw)


def rcpt(r: Restrictions, *args, **kw):
    return asyncio.run(r.check_rcpt(facts(*args, **kw)))


# ---------------------------------------------------------------------------------------------- defaults


def test_defaults_refuse_relaying_for_an_outsider():
    assert rcpt(restrictions(), "x@elsewhere.example") == status.relay_denied("x@elsewhere.example")


def test_defaults_let_mynetworks_and_authenticated_clients_relay():
    r = restrictions()
    assert rcpt(r, "x@elsewhere.example", client_addr="192.0.2.7") is None
    assert rcpt(r, "x@elsewhere.example", authenticated=True) is None


def test_defaults_refuse_an_unlisted_local_user_even_from_mynetworks():
    r = restrictions()
    assert rcpt(r, "alice@local.test") is None
    assert rcpt(r, "nobody@local.test", client_addr="192.0.2.7") == \
        status.user_unknown("nobody@local.test", "local recipient table")


def test_the_systems_users_as_local_recipients():
    # Postfix's default local_recipient_maps is the passwd file; mailflow's is a table, unix:passwd.byname here
    import pwd
    me = pwd.getpwuid(os.getuid()).pw_name.lower()
    config = config_from_dict({**BASE, "local_recipient_maps": ["unix:passwd.byname"]})
    rewriter = Rewriter(config)
    r = Restrictions(config, config.smtpd, rewriter, AddressMapper(config, rewriter), RESOLVER)
    assert rcpt(r, f"{me}@local.test") is None
    assert rcpt(r, "no-such-user-here@local.test") == \
        status.user_unknown("no-such-user-here@local.test", "local recipient table")


def test_unlisted_recipients_pass_when_the_check_is_off():
    assert rcpt(restrictions(reject_unlisted_recipient=False), "nobody@local.test") is None


def test_defer_unauth_destination_defers_like_postfix():
    r = restrictions(relay_restrictions=["permit_mynetworks", "defer_unauth_destination"])
    assert rcpt(r, "x@elsewhere.example") == status.relay_deferred("x@elsewhere.example")
    assert str(status.relay_deferred("x@e")).startswith("454 4.7.1 ")


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("items, reason", [
    (["permit_mynetworks", "rejct_unauth_destination"], "[1]: unknown restriction 'rejct_unauth_destination'"),
    (["check_sender_access"], "[0]: 'check_sender_access' needs an argument"),
    (["permit extra"], "[0]: 'permit' takes no argument"),
    (["check_recipient_access hash:/etc/x"], "[0]: check_recipient_access: 'hash:/etc/x' is not a lookup table"),
    (["check_policy_service tcp:127.0.0.1"], "[0]: 'tcp:127.0.0.1' is not a policy service"),
    (["check_client_access inline:{a=OK b}"], "[0]: check_client_access: inline: 'b' is not key=value"),
])
def test_a_misconfigured_list_fails_naming_the_list_and_the_item(items, reason):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": {"recipient_restrictions": items}}, "main.toml")
    assert str(info.value).startswith(f"main.toml: smtpd.recipient_restrictions{reason}")


@pytest.mark.parametrize("smtpd, reason", [
    ({"recipient_restrictions": ["strict"]}, "smtpd.recipient_restrictions[0]: unknown restriction 'strict'"),
    ({"restriction_classes": {"a": ["permit", "b"], "b": ["c"], "c": ["a"]}},
     "smtpd.restriction_classes: a: the restriction classes loop: a -> b -> c -> a"),
    ({"restriction_classes": {"a": ["nope"]}}, "smtpd.restriction_classes: a[0]: unknown restriction 'nope'"),
    ({"restriction_classes": {"Hold": ["permit"]}},
     "smtpd.restriction_classes: 'hold': a restriction class cannot have the name of a restriction or an access "
     "action"),
    ({"restriction_classes": {"a": []}}, "smtpd.restriction_classes: 'a': a restriction class is a non-empty list"),
    ({"restriction_classes": {"a": ["permit"]}, "client_restrictions": ["a b"]},
     "smtpd.client_restrictions[0]: restriction class 'a' takes no argument"),
])
def test_restriction_classes_are_checked_at_start(smtpd, reason):
    """An undefined class is a configuration error, and so is a loop of classes (Postfix 3.7.11's smtpd dies of
    it at start, signal 11: master logs `bad command startup -- throttling`)."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": smtpd}, "main.toml")
    assert str(info.value).startswith(f"main.toml: {reason}")


def test_a_restriction_class_runs_its_list_as_one_item():
    classes = {"Trusted": ["permit_mynetworks", "check_sender_access inline:{vip@remote.example=OK}"],
               "strict": ["reject_non_fqdn_sender", "trusted"]}
    r = restrictions(restriction_classes=classes, recipient_restrictions=["STRICT", "reject"])
    assert rcpt(r, client_addr="192.0.2.1") is None  # the class's permit ends the list
    assert rcpt(r, sender="vip@remote.example") is None
    assert rcpt(r, sender="user") == status.non_fqdn_address("user", "Sender address")
    assert rcpt(r) == status.access_denied("alice@local.test", "Recipient address")
    r = restrictions(restriction_classes=classes, relay_restrictions=["trusted", "reject_unauth_destination"])
    assert rcpt(r, "x@elsewhere.example", client_addr="192.0.2.1") is None
    assert rcpt(r, "x@elsewhere.example") == status.relay_denied("x@elsewhere.example")


def test_greylisting_named_only_in_an_access_value_is_a_configuration_error(caplog):
    """check_greylist (and SPF, DMARC) get their filter set up when a list or a class names them; named only in a
    table's value there is none: 451 4.3.5 and a warning, not a silent "no opinion"."""
    r = restrictions(recipient_restrictions=["check_sender_access inline:{ {s@remote.example=check_greylist} }",
                                             "permit"])
    assert rcpt(r) == status.restriction_config_error("s@remote.example", "Sender address")
    assert "check_greylist is not set up" in caplog.text


def test_classes_that_name_each_other_many_times_are_checked_in_linear_time():
    """Each class naming the next twice: walking every path would take 2**40 steps."""
    classes = {f"c{i}": [f"c{i + 1}", f"c{i + 1}"] for i in range(40)} | {"c40": ["permit_mynetworks"]}
    config = config_from_dict({**BASE, "smtpd": {"restriction_classes": classes,
                                                 "relay_restrictions": ["c0", "reject_unauth_destination"]}})
    assert len(config.smtpd.restriction_classes) == 41


def test_a_restriction_class_can_guard_the_relay():
    config_from_dict({"smtpd": {"restriction_classes": {"guard": ["permit_mynetworks", "reject_unauth_destination"]},
                                "relay_restrictions": ["guard"]}})
    with pytest.raises(ConfigError):
        config_from_dict({"smtpd": {"restriction_classes": {"open": ["permit_mynetworks"]},
                                    "relay_restrictions": ["open"]}})


def test_lists_that_cannot_refuse_relaying_are_refused_at_start():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"smtpd": {"relay_restrictions": ["permit_mynetworks"]}}, "main.toml")
    assert "reject_unauth_destination" in str(info.value)
    config_from_dict({"smtpd": {"relay_restrictions": [], "recipient_restrictions": ["reject_unauth_destination"]}})


# ---------------------------------------------------------------------------------------------- key orders


def test_client_keys_are_the_address_and_its_network_prefixes():
    assert client_full_keys("host.example.com") == (0, 3) and client_full_keys("unknown") == (0, 1)
    assert client_keys("192.168.1.7", "unknown") == ["unknown", "192.168.1.7", "192.168.1", "192.168", "192"]
    assert client_keys("192.168.1.7", "host.example.com")[:3] == ["host.example.com", "example.com", "com"]
    assert client_keys("2001:db8::1", "")[:3] == ["2001:db8::1", "2001:db8:0:0:0:0:0", "2001:db8:0:0:0:0"]


def test_address_keys_follow_access5():
    assert address_access_keys("u+tag@mail.example.com", "+") == [
        "u+tag@mail.example.com", "u@mail.example.com",  # no @domain: access(5) has none
        "mail.example.com", "example.com", "com", "u+tag@", "u@"]
    assert address_access_keys("", "+") == ["<>"]
    assert domain_keys("a.b.c.") == ["a.b.c", "b.c", "c"]


def test_address_keys_are_asked_in_postfix_s_quoting_then_in_internal_form():
    """mail_addr_find's legacy query form, as Postfix 3.7.11's check_recipient_access asks (test_quoting_vs_postfix.py:
    `w.1.@x.test` finds the key `w.1.@x.test`, `"w 2+ext"@x.test` the key `"w 2"@x.test`)."""
    keys = address_access_keys('"w 2+ext"@x.test', "+")
    assert keys == ['"w 2+ext"@x.test', "w 2+ext@x.test", '"w 2"@x.test', "w 2@x.test", "x.test", "test",
                    '"w 2+ext"@', "w 2+ext@", '"w 2"@', "w 2@"]
    assert address_access_search('"w 2+ext"@x.test', "+")[1] == (0, 1)  # a regexp table sees both forms
    assert address_access_keys('"w.1."@x.test', "+")[:2] == ['"w.1."@x.test', "w.1.@x.test"]
    assert address_access_search("u+tag@x.test", "+")[1] == (0,)


def test_an_unquoted_local_part_is_never_asked_as_none():
    """A plain local part is its own internal form: no `None@d.test` key (review of hunt-quote #7)."""
    keys, full = address_access_search("None+x@d.test", "+")
    assert keys == ["None+x@d.test", "None@d.test", "d.test", "test", "None+x@", "None@"]
    assert full == (0,)
    keys, full = address_access_search("Nonex+x@d.test", "+")
    assert "None@d.test" not in keys and full == (0,)


# ---------------------------------------------------------------------------------------------- access tables


def access(spec: str, stage: str = "recipient", kind: str = "recipient"):
    return restrictions(**{f"{stage}_restrictions": [f"check_{kind}_access {spec}"]})


def test_the_defer_restriction_says_what_postfix_says():
    # Postfix 3.7.11, smtpd_recipient_restrictions = defer (defer_code 450, its own enhanced code 4.3.2)
    assert str(rcpt(restrictions(recipient_restrictions=["defer"]))) == \
        "450 4.3.2 <alice@local.test>: Recipient address rejected: Try again later"


def test_access_actions_reject_defer_and_numeric_codes():
    table = ("inline:{ {spam@remote.example=REJECT go away}, defer@remote.example=DEFER,"
             " {n1@remote.example=550 no such luck}, {n2@remote.example=450 4.2.0 busy} }")
    r = access(table, kind="sender")
    assert rcpt(r, sender="spam@remote.example") == \
        status.restriction_rejected(554, "5.7.1", "spam@remote.example", "Sender address", "go away")
    assert rcpt(r, sender="defer@remote.example") == status.access_deferred("defer@remote.example", "Sender address")
    assert rcpt(r, sender="n1@remote.example") == \
        status.restriction_rejected(550, "5.7.1", "n1@remote.example", "Sender address", "no such luck")
    assert rcpt(r, sender="n2@remote.example") == \
        status.restriction_rejected(450, "4.2.0", "n2@remote.example", "Sender address", "busy")
    assert rcpt(r, sender="other@remote.example") is None


def test_ok_ends_the_list_and_dunno_goes_on():
    r = restrictions(recipient_restrictions=["check_recipient_access inline:{alice@local.test=DUNNO, "
                                             "local.test=OK}", "reject"])
    assert rcpt(r, "alice@local.test") == status.access_denied("alice@local.test", "Recipient address")
    r = restrictions(recipient_restrictions=["check_recipient_access inline:{local.test=OK}", "reject"])
    assert rcpt(r, "alice@local.test") is None


def test_ok_in_the_recipient_list_does_not_open_the_relay():
    r = restrictions(recipient_restrictions=["check_recipient_access static:OK"])
    assert rcpt(r, "x@elsewhere.example") == status.relay_denied("x@elsewhere.example")


def test_client_access_by_network_prefix_and_helo_access_by_parent_domain():
    r = access("inline:{203.0.113=REJECT}", stage="client", kind="client")
    assert rcpt(r) == status.access_denied(f"unknown[{OUTSIDER}]", "Client host")
    r = access("inline:{ {remote.example=REJECT bad helo} }", stage="helo", kind="helo")
    assert rcpt(r) == status.access_denied("client.remote.example", "Helo command", "bad helo")


def test_null_sender_is_looked_up_as_angle_brackets():
    r = access("inline:{<>=REJECT}", stage="sender", kind="sender")
    assert rcpt(r, sender="") is not None
    assert rcpt(r, sender="s@remote.example") is None


def test_discard_and_hold_mark_the_message():
    r = access("inline:{ {alice@local.test=DISCARD spam} }")
    f = facts()
    assert asyncio.run(r.check_rcpt(f)) is None and f.marks.discard == "spam"
    r = restrictions(recipient_restrictions=["check_recipient_access inline:{alice@local.test=HOLD}", "reject"])
    f = facts()
    assert asyncio.run(r.check_rcpt(f)) is not None and f.marks.hold  # HOLD goes on to the next item


def test_defer_if_permit_and_defer_if_reject_wait_for_the_verdict():
    # DEFER_IF_PERMIT: a permit (explicit, or the end of the lists) becomes the deferral; a refusal stands
    table = "check_recipient_access inline:{ {alice@local.test=DEFER_IF_PERMIT not now} }"
    assert rcpt(restrictions(recipient_restrictions=[table])) == \
        status.access_deferred("alice@local.test", "Recipient address", "not now")
    refused = rcpt(restrictions(recipient_restrictions=[table, "reject"]))
    assert refused is not None and refused.code == 554
    # DEFER_IF_REJECT: a later refusal becomes DEFER_IF_REJECT's own deferral; a permit stands
    table = "check_recipient_access inline:{alice@local.test=DEFER_IF_REJECT}"
    assert rcpt(restrictions(recipient_restrictions=[table])) is None
    assert rcpt(restrictions(recipient_restrictions=[table, "reject"])) == \
        status.conditional_deferral("alice@local.test", "Recipient address")


def test_warn_prepend_and_redirect_go_on_and_mark_the_message(caplog):
    r = access("inline:{ {alice@local.test=WARN look at this}, {bob@local.test=INFO just so} }")
    with caplog.at_level("INFO", logger="mailflow"):
        assert rcpt(r) is None and rcpt(r, "bob@local.test") == status.user_unknown("bob@local.test")
    assert "NOQUEUE: warn: RCPT from unknown[203.0.113.9]: look at this; from=<s@remote.example> " \
        "to=<alice@local.test> proto=ESMTP helo=<client.remote.example>" in caplog.text
    assert "NOQUEUE: info: RCPT from unknown[203.0.113.9]: just so; from=<s@remote.example> " in caplog.text
    r = restrictions(recipient_restrictions=[
        "check_recipient_access inline:{ {alice@local.test=PREPEND X-Tag: one} }",
        "check_recipient_access inline:{ {alice@local.test=REDIRECT bob@elsewhere.example} }"])
    f = facts()
    assert asyncio.run(r.check_rcpt(f)) is None
    assert f.marks.prepend == ["X-Tag: one"] and f.marks.redirect == "bob@elsewhere.example"



def test_marking_actions_without_their_argument_are_ignored_as_postfix_ignores_them(caplog):
    """Postfix's check_table_result warns and goes on (DUNNO); the next item decides."""
    values = {"a": "PREPEND no colon", "b": "REDIRECT not an address", "c": "BCC", "d": "FILTER smtp"}
    table = "inline:{ %s }" % ", ".join(f"{{{local}@local.test={value}}}" for local, value in values.items())
    r = restrictions(recipient_restrictions=[f"check_recipient_access {table}", "reject"])
    with caplog.at_level("WARNING", logger="mailflow"):
        for local in values:
            f = facts(f"{local}@local.test")
            assert asyncio.run(r.check_rcpt(f)) == status.access_denied(f"{local}@local.test", "Recipient address")
            assert (f.marks.prepend, f.marks.redirect, f.marks.bcc, f.marks.filter) == ([], None, [], None)
    assert "access action PREPEND 'no colon' requires header: text; ignored" in caplog.text


def test_prepend_at_the_end_of_data_is_ignored_and_an_all_digit_action_is_ok(caplog):
    """Postfix's check_table_result: PREPEND must come before the end of data (warned, DUNNO); an all-digit
    value (a POP-before-SMTP time stamp) is OK."""
    r = access("inline:{ {s@remote.example=PREPEND X-Late: yes} }", stage="end_of_data", kind="sender")
    f = facts()
    with caplog.at_level("WARNING", logger="mailflow"):
        assert asyncio.run(r.check_end_of_data(f)) is None
    assert f.marks.prepend == [] and "PREPEND must be used before end_of_data_restrictions" in caplog.text
    r = restrictions(recipient_restrictions=["check_recipient_access inline:{alice@local.test=1733366400}",
                                             "reject"])
    assert rcpt(r) is None


def test_a_numeric_action_keeps_its_detail_in_the_codes_class():
    r = access("inline:{ {alice@local.test=450 5.7.0 odd} }")
    assert rcpt(r) == status.restriction_rejected(450, "4.7.0", "alice@local.test", "Recipient address", "odd")


def test_a_numeric_action_takes_any_status_dsn_split_takes():
    """The numeric action's status was parsed by a pattern of its own that took only classes 4 and 5: `550 2.1.1
    gone` kept "2.1.1 gone" as its text under 5.7.1, where Postfix's dsn_split takes any valid status (2, 4, 5) and
    the code's class wins (5.1.1 "gone"), as mailflow's REJECT text already did. One pattern now (syntax.
    ENHANCED_STATUS); a status that is not one (non-ASCII digits, four-digit detail) stays part of the text."""
    r = access("inline:{ {alice@local.test=550 2.1.1 gone}, {bob@local.test=550 5.1.\u0661 odd}, "
               "{carol@local.test=450 4.1.1000 odd} }")
    assert rcpt(r) == status.restriction_rejected(550, "5.1.1", "alice@local.test", "Recipient address", "gone")
    assert rcpt(r, "bob@local.test") == \
        status.restriction_rejected(550, "5.7.1", "bob@local.test", "Recipient address", "5.1.\u0661 odd")
    assert rcpt(r, "carol@local.test") == \
        status.restriction_rejected(450, "4.7.1", "carol@local.test", "Recipient address", "4.1.1000 odd")


def test_an_address_status_is_fitted_to_what_is_refused():
    """Postfix's smtpd_dsn_fix (checked against Postfix 3.7.11): one entry refusing a sender, a recipient or a
    client says X.1.8 for the sender, X.1.2 for the recipient and X.0.0 for the client; other statuses stay."""
    table = "inline:{ {s@remote.example=REJECT 5.1.2 bad}, {alice@local.test=451 4.1.8 later}, " \
            "{203.0.113=DEFER_IF_PERMIT 4.1.1 maybe}, {t@remote.example=REJECT 5.7.2 policy} }"
    r = restrictions(client_restrictions=[f"check_client_access {table}"],
                     sender_restrictions=[f"check_sender_access {table}"],
                     recipient_restrictions=[f"check_recipient_access {table}"])
    assert rcpt(r, sender="s@remote.example") == \
        status.restriction_rejected(554, "5.1.8", "s@remote.example", "Sender address", "bad")
    assert rcpt(r, sender="t@remote.example") == \
        status.restriction_rejected(554, "5.7.2", "t@remote.example", "Sender address", "policy")
    assert rcpt(r, "alice@local.test", sender="other@remote.example") == \
        status.restriction_rejected(451, "4.1.2", "alice@local.test", "Recipient address", "later")
    r = access(table, stage="client", kind="client")
    assert rcpt(r) == status.conditional_deferral(f"unknown[{OUTSIDER}]", "Client host", "maybe", "4.0.0")


def test_restriction_names_as_actions_and_unknown_actions():
    r = access("inline:{alice@local.test=reject_non_fqdn_sender, b@local.test=FROBNICATE}")
    assert rcpt(r, sender="user") == status.non_fqdn_address("user", "Sender address")
    assert rcpt(r, "b@local.test") == status.restriction_config_error("b@local.test", "Recipient address")


def test_access_values_name_restriction_classes_and_lists(caplog):
    classes = {"strict": ["reject_non_fqdn_sender", "reject"], "loop": ["check_sender_access inline:{x@y.test=loop}"]}
    table = ("inline:{ alice@local.test=strict, {b@relay.test=permit_mynetworks, reject}, c@relay.test=undefined,"
             " d@relay.test=loop, e@relay.test=check_client_access:texthash:/x, f@relay.test=reject_rbl_client }")
    r = restrictions(restriction_classes=classes, recipient_restrictions=[f"check_recipient_access {table}"])
    assert rcpt(r, sender="user") == status.non_fqdn_address("user", "Sender address")
    assert rcpt(r) == status.access_denied("alice@local.test", "Recipient address")
    assert rcpt(r, "b@relay.test", client_addr="192.0.2.1") is None
    assert rcpt(r, "b@relay.test") == status.access_denied("b@relay.test", "Recipient address")
    for bad in ("c", "e", "f"):  # undefined, a lookup table (Postfix: name a class instead), an argument missing
        assert rcpt(r, f"{bad}@relay.test") == status.restriction_config_error(f"{bad}@relay.test", "Recipient address")
    assert rcpt(r, "d@relay.test", sender="x@y.test") == \
        status.restriction_config_error("x@y.test", "Sender address")  # (the loop, cut after 100 levels)
    assert "causes unreasonable recursion" in caplog.text


def test_a_table_that_cannot_answer_defers():
    r = access("fail:broken")
    assert rcpt(r) == status.restriction_config_error("alice@local.test", "Recipient address")


# ---------------------------------------------------------------------------------------------- syntax checks


def test_non_fqdn_and_invalid_helo():
    r = restrictions(helo_restrictions=["reject_invalid_helo_hostname", "reject_non_fqdn_helo_hostname"],
                     recipient_restrictions=["reject_non_fqdn_recipient"])
    assert rcpt(r, helo="bad_name!") == status.invalid_helo("bad_name!")
    assert rcpt(r, helo="laptop") == status.non_fqdn_helo("laptop")
    assert rcpt(r, helo="[192.0.2.1]") is None
    assert rcpt(r, helo="client.example.") is None
    # a bare address is valid (reject_invalid_helo_hostname) but not fully qualified, as Postfix judges it
    assert rcpt(r, helo="192.0.2.1") == status.non_fqdn_helo("192.0.2.1")
    only_fqdn = restrictions(helo_restrictions=["reject_non_fqdn_helo_hostname"])
    assert rcpt(only_fqdn, helo="bad!name.example") == status.non_fqdn_helo("bad!name.example")
    assert rcpt(r, "alice@localhost", client_addr="192.0.2.7") == \
        status.non_fqdn_address("alice@localhost", "Recipient address")



@pytest.mark.parametrize("helo, valid", [("01.2.3.4", True), ("2001:db8::1", True), ("::ffff:192.0.2.01", True),
                                         ("0.1.2.3", False), ("2001:db8::g", False), ("IPv6:2001:db8::1", False)])
def test_a_bare_address_helo_is_valid_as_postfixs_valid_hostaddr_takes_it(helo, valid):
    """reject_invalid_helo_hostname takes valid_hostname or valid_hostaddr (smtpd_check.c): the literal parser's
    rules without the brackets, leading zeros and IPv6 included (refused 501 before)."""
    r = restrictions(helo_restrictions=["reject_invalid_helo_hostname"])
    assert rcpt(r, helo=helo) == (None if valid else status.invalid_helo(helo))


# ---------------------------------------------------------------------------------------------- DNS


@pytest.mark.parametrize("rcpt_addr, expected", [
    ("x@nx.example", status.domain_not_found("x@nx.example", 450)),
    ("x@nullmx.example", status.null_mx("x@nullmx.example", "nullmx.example")),
    ("x@mx.example", None),
    ("x@a-only.example", None),
    # a local domain is never looked up; the unlisted check answers
    ("nobody-known@local.test", status.user_unknown("nobody-known@local.test")),
])
def test_reject_unknown_recipient_domain(rcpt_addr, expected):
    r = restrictions(recipient_restrictions=["reject_unknown_recipient_domain", "permit_mynetworks",
                                             "reject_unauth_destination"])
    reply = rcpt(r, rcpt_addr, client_addr="192.0.2.7")
    assert reply == expected


def test_unknown_recipient_domain_reject_code_is_configurable():
    r = restrictions(recipient_restrictions=["reject_unknown_recipient_domain"], unknown_address_reject_code=550)
    assert rcpt(r, "x@nx.example", client_addr="192.0.2.7") == status.domain_not_found("x@nx.example", 550)


def test_rbl_listed_client_is_refused_and_a_filter_narrows_the_answers():
    assert str(rcpt(restrictions(client_restrictions=["reject_rbl_client bl.test"]))) == \
        f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test"
    assert rcpt(restrictions(client_restrictions=["reject_rbl_client bl.test=127.0.0.3"])) is None
    # Postfix's ip_match forms (Mail-in-a-Box's zen.spamhaus.org=127.0.0.[2..11])
    assert rcpt(restrictions(client_restrictions=["reject_rbl_client bl.test=127.0.0.[2..11]"])) is not None
    assert rcpt(restrictions(client_restrictions=["reject_rbl_client bl.test=127.0.[0;1].[1;3..9]"])) is None
    assert rcpt(restrictions(client_restrictions=["reject_rbl_client bl.test"]), client_addr="198.51.100.4") is None


def test_a_dns_list_s_reason_is_each_txt_record_s_first_string_as_postfix_s():
    """Postfix 3.7's dns_lookup keeps a TXT record's first string (the interop test shows it); joined, the reply
    had "first stringsecond"."""
    resolver = StaticResolver(addresses={"9.113.0.203.bl.test": ["127.0.0.2"]},
                              txt={"9.113.0.203.bl.test": [("first string", "second"), "another record"]})
    assert str(rcpt(restrictions(resolver, client_restrictions=["reject_rbl_client bl.test"]))) == \
        f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test; first string / another record"


class WithoutTxtStrings:
    """A resolver given to Mailflow(resolver=...) written before the protocol had txt_strings."""

    def __init__(self, resolver: StaticResolver) -> None:
        self._resolver = resolver

    def __getattr__(self, name: str):
        if name == "txt_strings":
            raise AttributeError(name)
        return getattr(self._resolver, name)


def test_a_resolver_without_txt_strings_gives_the_reason_of_its_txt_records():
    """It raised AttributeError out of reject_rbl_client (review of dnstcp, LOW 5)."""
    resolver = WithoutTxtStrings(StaticResolver(
        addresses={"9.113.0.203.bl.test": ["127.0.0.2"]},
        txt={"9.113.0.203.bl.test": [("first string", "second"), "another record"]}))
    assert str(rcpt(restrictions(resolver, client_restrictions=["reject_rbl_client bl.test"]))) == \
        f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test; " \
        "first stringsecond / another record"


def test_a_bad_map_template_gives_way_to_the_default_even_when_that_is_no_reply(tmp_path, caplog):
    # Postfix 3.7's rbl_reject_reply forgets the bad template, expands the default and, as that is no reply, logs
    # it and answers 450 4.7.1 Service unavailable (mailflow expanded the bad template again and raised)
    (tmp_path / "rbl_replies").write_text("bl.test 554 ${rbl_reason\n")
    r = restrictions(client_restrictions=["reject_rbl_client bl.test"], default_rbl_reply="blocked by $rbl_domain",
                     rbl_reply_maps=[f"texthash:{tmp_path}/rbl_replies"])
    with caplog.at_level("WARNING", logger="mailflow.smtpd"):
        assert rcpt(r) == status.RBL_REPLY_ERROR
    assert caplog.messages == ["rbl_reject_reply: bad rbl reply template for domain bl.test: 554 ${rbl_reason",
                               "rbl response code configuration error: blocked by bl.test"]


def test_a_map_template_that_is_not_ascii_gives_way_to_the_default(tmp_path, caplog):
    (tmp_path / "rbl_replies").write_text("bl.test 554 Rejet\u00e9: $rbl_reason\n", encoding="utf-8")
    r = restrictions(client_restrictions=["reject_rbl_client bl.test"],
                     rbl_reply_maps=[f"texthash:{tmp_path}/rbl_replies"])
    with caplog.at_level("WARNING", logger="mailflow.smtpd"):
        assert str(rcpt(r)) == f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test"
    assert "bad rbl reply template for domain bl.test: 554 Rejet\u00e9: $rbl_reason" in caplog.text


def test_a_map_template_with_a_line_break_gives_way_to_the_default(tmp_path, caplog):
    # a sqlite: value can hold one: sent, it would end the reply early and the rest be read as the next reply
    db = tmp_path / "rbl.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE rbl (k TEXT PRIMARY KEY, v TEXT)")
        connection.execute("INSERT INTO rbl VALUES ('bl.test', ?)", ("554 go away\r\n250 2.0.0 Ok",))
    connection.close()
    (tmp_path / "rbl.cf").write_text(f"dbpath = {db}\nquery = SELECT v FROM rbl WHERE k='%s'\n")
    r = restrictions(client_restrictions=["reject_rbl_client bl.test"], rbl_reply_maps=[f"sqlite:{tmp_path}/rbl.cf"])
    with caplog.at_level("WARNING", logger="mailflow.smtpd"):
        assert str(rcpt(r)) == f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test"
    assert "bad rbl reply template for domain bl.test" in caplog.text


def test_log_access_permit_actions_matches_names_and_access_values_in_any_case(caplog):
    # Postfix's smtpd_acl_permit looks the action up case-insensitively: PERMIT_MYNETWORKS names
    # permit_mynetworks, `ok` an access table's OK
    r = restrictions(client_restrictions=["permit_mynetworks"],
                     sender_restrictions=["check_sender_access inline:{s@remote.example=OK}"],
                     log_access_permit_actions=["PERMIT_MYNETWORKS", "ok"])
    with caplog.at_level("INFO", logger="mailflow.smtpd"):
        assert rcpt(r, client_addr="192.0.2.7") is None
        assert rcpt(r) is None
    permits = [m.split(": ", 3)[3].split(" for ")[0] for m in caplog.messages if m.startswith("NOQUEUE: permit: ")]
    # (a client in mynetworks: its client list, its sender list, the relay list's default permit_mynetworks)
    assert permits == ["action=permit_mynetworks", "action=OK", "action=permit_mynetworks", "action=OK"]


# ---------------------------------------------------------------------------------------------- policy


def test_policy_attributes_cannot_inject_lines():
    assert encode_request({"sender": "a\nrecipient=evil", "size": 3}) == b"sender=a recipient=evil\nsize=3\n\n"


def test_unreachable_policy_service_gives_the_default_action():
    unused_port = free_port()
    r = restrictions(recipient_restrictions=[f"check_policy_service inet:127.0.0.1:{unused_port}"],
                     policy_service_timeout="2s")
    assert rcpt(r) == status.restriction_rejected(451, "4.3.5", "alice@local.test", "Recipient address",
                                                  "Server configuration problem")


async def test_policy_server_that_never_answers_times_out():
    async def silent(reader, writer):
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = PolicyClient(f"inet:127.0.0.1:{port}", timeout=0.2)
        with pytest.raises(PolicyError, match="timeout"):
            await client.query({"request": "smtpd_access_policy"})
    finally:
        server.close()
        await server.wait_closed()


async def test_prepend_and_redirect_reach_the_queued_message(mailflow_server, tmp_path):
    from tests.support import SmtpClient, eventually, maildir_messages
    mf = await mailflow_server(smtpd={"recipient_restrictions": [
        "check_recipient_access inline:{ {alice@local.test=PREPEND X-Checked: by an access table} }",
        "check_sender_access inline:{ {redirected@remote.test=REDIRECT bob@local.test} }"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.send_message(b"Subject: tagged\r\n\r\nbody\r\n"))[0] == 250
    assert (await c.cmd("MAIL FROM:<redirected@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: elsewhere\r\n\r\nbody\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.close()
    alice = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    bob = await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"))
    assert len(alice) == 1 and b"\nX-Checked: by an access table\n" in alice[0].split(b"\n\n")[0]
    assert len(bob) == 1 and b"Subject: elsewhere" in bob[0]  # REDIRECT: bob instead of alice
    assert b"X-Checked" in bob[0]  # (its RCPT alice@local.test matched the PREPEND table too)


async def test_bcc_sends_one_more_copy(mailflow_server, tmp_path):
    from tests.support import SmtpClient, eventually, maildir_messages
    mf = await mailflow_server(smtpd={"recipient_restrictions": [
        "check_sender_access inline:{ {watched@remote.test=BCC bob@local.test} }"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    for sender, subject in (("watched@remote.test", b"copied"), ("other@remote.test", b"not copied")):
        assert (await c.cmd(f"MAIL FROM:<{sender}>"))[0] == 250
        assert (await c.cmd("RCPT TO:<alice@local.test> NOTIFY=NEVER"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        await c.send(b"Subject: " + subject + b"\r\n\r\nbody\r\n.\r\n")
        assert (await c.reply())[0] == 250
    await c.close()
    alice = await eventually(lambda: len(maildir_messages(tmp_path / "mail" / "alice" / "Maildir")) == 2)
    bob = await eventually(lambda: maildir_messages(tmp_path / "mail" / "bob" / "Maildir"))
    assert alice and len(bob) == 1 and b"Subject: copied\n" in bob[0]


async def test_every_bcc_of_a_transaction_gets_its_copy(mailflow_server, tmp_path):
    """Postfix 3.2 and later keep each access BCC (smtpd_check.c's saved_bcc is a list): a sender entry and a
    recipient entry each add their recipient; one named twice gets one copy."""
    from tests.support import eventually, maildir_messages, send
    mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok, bob=ok, carol=ok}"], smtpd={
        "recipient_restrictions": ["check_sender_access inline:{ {watched@remote.test=BCC bob@local.test} }",
                                   "check_recipient_access inline:{ {alice@local.test=BCC carol@local.test} }",
                                   "check_recipient_access inline:{ {alice@local.test=BCC bob@local.test} }"]})
    refused, reply = await send(mf.smtp_addresses[0][1], "watched@remote.test", ["alice@local.test"],
                                b"Subject: copied twice\r\n\r\nbody\r\n")
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as "), reply
    copies = {user: await eventually(lambda u=user: maildir_messages(tmp_path / "mail" / u / "Maildir"))
              for user in ("alice", "bob", "carol")}
    assert {user: len(found) for user, found in copies.items()} == {"alice": 1, "bob": 1, "carol": 1}


async def test_a_redirect_takes_the_bcc_copies_too(mailflow_server, tmp_path):
    """Postfix's qmgr sends every recipient of a message with a REDIRECT record to the redirect address, the
    recipients an access BCC added included: one copy, to the redirect target."""
    from tests.support import eventually, maildir_messages, send
    mf = await mailflow_server(local_recipient_maps=["inline:{alice=ok, bob=ok, carol=ok}"], smtpd={
        "recipient_restrictions": ["check_sender_access inline:{ {watched@remote.test=BCC bob@local.test} }",
                                   "check_recipient_access inline:{ {alice@local.test=REDIRECT carol@local.test} }"]})
    refused, reply = await send(mf.smtp_addresses[0][1], "watched@remote.test", ["alice@local.test"],
                                b"Subject: redirected\r\n\r\nbody\r\n")
    assert refused == {} and reply.startswith("2.0.0 Ok: queued as "), reply
    assert len(await eventually(lambda: maildir_messages(tmp_path / "mail" / "carol" / "Maildir"))) == 1
    await mf.stop()
    assert [maildir_messages(tmp_path / "mail" / u / "Maildir") for u in ("alice", "bob")] == [[], []]


# ---------------------------------------------------------------------------------------------- lists in combination
# (what tests/interop/test_restriction_lists_vs_postfix.py found against Postfix 3.7.11)


def test_the_helo_list_is_skipped_without_a_helo_name():
    # Postfix's smtpd_check_helo returns at once without a name: a `reject` in the list refuses nobody
    r = restrictions(helo_restrictions=["check_client_access inline:{203.0.113.9=REJECT}", "reject"])
    assert rcpt(r, helo="") is None
    assert str(rcpt(r)) == "554 5.7.1 <unknown[203.0.113.9]>: Client host rejected: Access denied"


def test_defer_if_permit_and_defer_if_reject_as_items():
    # Postfix 3.7.11's generic items: 450 4.7.0 `<x>: … rejected: defer_if_permit requested` (not defer_code)
    r = restrictions(sender_restrictions=["defer_if_permit", "permit"])
    assert str(rcpt(r)) == "450 4.7.0 <s@remote.example>: Sender address rejected: defer_if_permit requested"
    r = restrictions(recipient_restrictions=["defer_if_reject", "reject"])
    assert str(rcpt(r)) == "450 4.7.0 <alice@local.test>: Recipient address rejected: defer_if_reject requested"
    r = restrictions(recipient_restrictions=["defer_if_reject", "check_recipient_access inline:{alice@local.test=OK}"])
    assert rcpt(r) is None  # no refusal to defer
    # a defer_if_permit guards the relay, as Postfix's rcpt_required list has it
    config_from_dict({"smtpd": {"relay_restrictions": ["defer_if_permit"]}})


def test_a_permit_before_the_relay_guard_leaves_the_relay_open():
    # Postfix 3.7.11's has_required stops at a permit (its smtpd dies: "specify at least one working instance
    # of …"); mailflow is stricter on purpose: a class reaching a bare permit before a guard ends the outer search
    # too (Postfix searches on and relays for anyone), and a run of warn_if_reject warns the item after the run
    classes = {"open": ["permit"], "nested": ["open", "reject_unauth_destination"],
               "warned": ["reject_unauth_destination", "permit"], "guard": ["reject_unauth_destination"],
               "mine": ["permit_mynetworks"]}
    unguarded = (["permit", "reject_unauth_destination"], ["warn_if_reject", "reject_unauth_destination"],
                 ["open", "reject_unauth_destination"], ["nested", "reject_unauth_destination"],
                 ["warn_if_reject", "warn_if_reject", "reject_unauth_destination"],
                 ["warn_if_reject", "permit", "reject_unauth_destination"],
                 ["warn_if_reject", "warned", "reject_unauth_destination"])
    for relay in unguarded:
        with pytest.raises(ConfigError, match=r"smtpd: .*must reach one of .*\(relay_restrictions"):
            config_from_dict({"smtpd": {"restriction_classes": classes, "relay_restrictions": relay,
                                        "recipient_restrictions": []}})
    guarded = (["permit_mynetworks", "permit_sasl_authenticated", "reject_unauth_destination"],
               ["check_client_access inline:{192.0.2.1=OK}", "reject_unauth_destination"], ["guard"],
               ["mine", "reject_unauth_destination"], ["warn_if_reject", "guard", "reject_unauth_destination"],
               ["warn_if_reject", "warn_if_reject", "reject", "reject_unauth_destination"],
               ["warn_if_reject", "guard", "guard"], ["check_helo_access static:DUNNO", "guard"])
    for relay in guarded:
        config_from_dict({"smtpd": {"restriction_classes": classes, "relay_restrictions": relay,
                                    "recipient_restrictions": []}})
    config_from_dict({"smtpd": {"relay_restrictions": ["permit"], "recipient_restrictions": ["defer"]}})
    config_from_dict({"smtpd": {"relay_restrictions": [], "recipient_restrictions": ["reject_unauth_destination"]}})


def test_a_permit_the_client_chooses_before_the_guard_leaves_the_relay_open():
    # Postfix 3.7.11 starts with these and relays for a client that says `HELO 198.51.100.7` (any client, for a
    # static: table); mailflow promises no open relay, so they count as a bare permit
    for item in ("permit_naked_ip_address", "check_helo_access static:OK", "check_client_access static:relay",
                 "check_sender_access static:{ permit }", "check_recipient_access static:250"):
        with pytest.raises(ConfigError, match=r"relay_restrictions reaches a permit first: relay_restrictions\[0\]"):
            config_from_dict({"smtpd": {"relay_restrictions": [item, "reject_unauth_destination"],
                                        "recipient_restrictions": []}})


def test_a_static_access_value_starting_with_digits_is_a_reject_not_a_permit():
    # Postfix's check_table_result tests the whole value for digits: `550 5.7.1 go away` is a reject, and Postfix
    # starts with these lists (it refuses everyone)
    for item in ("check_client_access static:{550 5.7.1 go away}", "check_helo_access static:{450 4.7.1 later}"):
        config_from_dict({"smtpd": {"relay_restrictions": [item, "reject_unauth_destination"],
                                    "recipient_restrictions": []}})


def test_the_relay_guard_refusal_says_where():
    classes = {"c1": ["c2"], "c2": ["check_helo_access static:DUNNO", "permit"]}
    with pytest.raises(ConfigError, match=r"relay_restrictions reaches a permit first: relay_restrictions\[1\] c1 -> "
                                          r"c1\[0\] c2 -> c2\[1\] permit; recipient_restrictions reaches none\)"):
        config_from_dict({"smtpd": {"restriction_classes": classes, "recipient_restrictions": [],
                                    "relay_restrictions": ["permit_mynetworks", "c1", "reject_unauth_destination"]}})
    with pytest.raises(ConfigError, match=r"relay_restrictions: reject_unauth_destination under warn_if_reject only "
                                          r"warns: relay_restrictions\[2\] reject_unauth_destination;"):
        config_from_dict({"smtpd": {"recipient_restrictions": [], "relay_restrictions": [
            "permit_mynetworks", "warn_if_reject", "reject_unauth_destination"]}})
    with pytest.raises(ConfigError, match=r"relay_restrictions: defer_unauth_destination under warn_if_reject only "
                                          r"warns: relay_restrictions\[0\] c1 -> c1\[1\] defer_unauth_destination;"):
        config_from_dict({"smtpd": {"recipient_restrictions": [], "relay_restrictions": ["c1"], "restriction_classes": {
            "c1": ["warn_if_reject", "defer_unauth_destination"]}}})


def test_a_long_chain_of_restriction_classes_loads():
    # no recursion in the loop check or the relay guard's walk (3000 classes raised a bare RecursionError)
    classes = {f"c{i}": [f"c{i + 1}"] for i in range(3000)}
    classes["c3000"] = ["reject_unauth_destination"]
    config_from_dict({"smtpd": {"restriction_classes": classes, "relay_restrictions": ["c0"]}})
    classes["c3000"] = ["permit"]
    with pytest.raises(ConfigError, match=r"relay_restrictions\[0\] c0 -> c0\[0\] c1 -> c1\[0\] c2 -> \.\.\. -> "
                                          r"c2999\[0\] c3000 -> c3000\[0\] permit;"):
        config_from_dict({"smtpd": {"restriction_classes": classes, "relay_restrictions": ["c0"],
                                    "recipient_restrictions": []}})
    classes["c3000"] = ["c0"]
    with pytest.raises(ConfigError, match=r"c0: the restriction classes loop: c0 -> c1 -> .* -> c3000 -> c0"):
        config_from_dict({"smtpd": {"restriction_classes": classes, "relay_restrictions": ["c0"]}})


def test_the_relay_guard_walks_a_chain_of_20000_classes_in_memory_linear_in_it():
    # each class's Found held its whole path: 20 000 classes peaked at 1.5 GB at config load; now it keeps what
    # Found.where prints (about 450 bytes a class measured)
    count = 20_000
    classes = {f"c{i}": [f"c{i + 1}"] for i in range(count)}
    classes[f"c{count}"] = ["permit"]
    tracemalloc.start()
    try:
        found = relay_guard("relay_restrictions", ["c0"], classes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found.result == PERMITTED and peak < 2_000 * count
    assert found.where() == (f"relay_restrictions[0] c0 -> c0[0] c1 -> c1[0] c2 -> ... -> c{count - 1}[0] c{count} "
                             f"-> c{count}[0] permit")


def test_the_sender_list_is_skipped_outside_a_transaction():
    # a VRFY before MAIL: Postfix's smtpd_check_mail returns at once without a sender (its `defer` is not met)
    r = restrictions(sender_restrictions=["defer"])
    assert rcpt(r, sender=None) is None
    assert str(rcpt(r, sender="")) == "450 4.3.2 <>: Sender address rejected: Try again later"


# ---------------------------------------------------------------------------------------------- Postfix 3.7's others


def test_permit_inet_interfaces_and_check_relay_domains_against_the_relay_guard():
    # permit_inet_interfaces permits a client this host is, not what the client chooses: walked past, as
    # permit_mynetworks; check_relay_domains refuses relaying, and is a guard as in Postfix's rcpt_required
    config_from_dict({"smtpd": {"relay_restrictions": ["permit_inet_interfaces", "reject_unauth_destination"],
                                "recipient_restrictions": []}})
    config_from_dict({"smtpd": {"relay_restrictions": ["check_relay_domains"], "recipient_restrictions": []}})
    with pytest.raises(ConfigError, match="must reach one of"):
        config_from_dict({"smtpd": {"relay_restrictions": ["permit_inet_interfaces"], "recipient_restrictions": []}})


def test_permit_inet_interfaces_permits_the_connection_s_own_host_only():
    r = restrictions(client_restrictions=["permit_inet_interfaces", "reject"])
    assert rcpt(r, on_this_host=True) is None
    # the client's address (XCLIENT's) does not count: the connection's, at connect (handler.py)
    assert str(rcpt(r, client_addr="127.0.0.1")) == \
        "554 5.7.1 <unknown[127.0.0.1]>: Client host rejected: Access denied"


@pytest.mark.parametrize("client, reply", [
    ("127.0.0.1", "250 2.1.5 Ok"),  # lo's own address: this host
    # another loopback address is no interface's: not this host, though it reaches a listener on itself (as a
    # wildcard listener is reached; Postfix 3.7.11, inet_interfaces = all: 554 5.7.1 <x@elsewhere.test>: Relay
    # access denied). The listener is the client's own address: the same connection, tests stay on loopback.
    ("127.0.0.2", "554 5.7.1 <x@elsewhere.test>: Relay access denied"),
])
async def test_permit_inet_interfaces_under_a_wildcard_listener_is_an_interface_address(mailflow_server, client,
                                                                                         reply):
    mf = await mailflow_server(smtpd={"listen": [f"{client}:0"], "error_sleep_time": "0s", "recipient_restrictions": [],
                                      "relay_restrictions": ["permit_inet_interfaces", "reject_unauth_destination"]})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((client, 0))
    sock.setblocking(False)
    await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (client, mf.smtpd.address_of("mta")[1])), 5)
    c = await SmtpClient.connect(0, sock=sock)
    for command in ("HELO c.test", "MAIL FROM:<s@remote.test>"):
        assert (await c.cmd(command))[0] == 250
    answer = await c.cmd("RCPT TO:<x@elsewhere.test>")
    await c.close()
    assert answer.text.startswith(reply), answer


def test_items_after_check_relay_domains_are_warned_of_once_per_list_at_load(caplog):
    # Postfix 3.7's words (it logs them at each evaluation); not after warn_if_reject, whose list goes on
    with caplog.at_level("WARNING", logger="mailflow.smtpd"):
        restrictions(relay_restrictions=["check_relay_domains", "Reject"], recipient_restrictions=[
            "warn_if_reject", "check_relay_domains", "permit_mynetworks", "reject_unauth_destination"],
            restriction_classes={"c": ["CHECK_RELAY_DOMAINS", "check_sender_access inline:{a=OK}"]},
            sender_restrictions=["c"])
    assert sorted(m for m in caplog.messages if "is ignored" in m) == [
        "restriction `Reject' after `check_relay_domains' is ignored",
        "restriction `check_sender_access' after `check_relay_domains' is ignored"]


def test_check_relay_domains_permits_a_relay_domains_client_or_destination(caplog):
    r = restrictions(relay_restrictions=["check_relay_domains"], recipient_restrictions=[])
    with caplog.at_level("WARNING", logger="mailflow.smtpd"):
        assert rcpt(r, "x@elsewhere.example") == \
            status.Reply(554, "5.7.1", "<x@elsewhere.example>: Recipient address rejected: Relay access denied")
        assert rcpt(r, "x@elsewhere.example", client_name="mx.relay.test") is None  # (a subdomain too)
        assert rcpt(r, "x@elsewhere.example", client_name="relay.test.evil.example") is not None
        assert rcpt(r, "r@relay.test") is None and rcpt(r, "alice@local.test") is None
    assert [m for m in caplog.messages if 'restriction "check_relay_domains" will be removed' in m] and \
        len([m for m in caplog.messages if "will be removed" in m]) == 1
    assert rcpt(restrictions(relay_restrictions=["check_relay_domains"], recipient_restrictions=[],
                             relay_domains_reject_code=450), "x@elsewhere.example").code == 450


def test_the_null_sender_key_is_null_access_lookup_key():
    table = "check_sender_access inline:{ {<>=REJECT angle}, {nullsender=REJECT named} }"
    assert rcpt(restrictions(sender_restrictions=[table]), sender="").text == "<>: Sender address rejected: angle"
    assert rcpt(restrictions(sender_restrictions=[table], null_access_lookup_key="nullsender"), sender="").text == \
        "<>: Sender address rejected: named"
    with pytest.raises(ConfigError, match="null_access_lookup_key"):
        restrictions(null_access_lookup_key="two words")


def test_a_dns_list_answer_need_not_be_127_as_postfix_s_rbl_match_addr():
    """Postfix applies the filter alone to a list's A records (smtpd_check.c, rbl_match_addr), and without a filter
    any A record lists the client, as mailflow's postscreen takes it (the interop test compares with Postfix)."""
    resolver = StaticResolver(addresses={"9.113.0.203.bl.test": ["10.0.0.2"]})
    assert str(rcpt(restrictions(resolver, client_restrictions=["reject_rbl_client bl.test=10.0.0.2"]))) == \
        f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test"
    assert rcpt(restrictions(resolver, client_restrictions=["reject_rbl_client bl.test=10.0.0.[0..1]"])) is None
    assert str(rcpt(restrictions(resolver, client_restrictions=["reject_rbl_client bl.test"]))) == \
        f"554 5.7.1 Service unavailable; Client host [{OUTSIDER}] blocked using bl.test"
