"""local(8)'s routing settings in the local transport: mailbox_command, mailbox_transport, fallback_transport and
luser_relay (Postfix's mailbox.c and unknown.c), and their config checks.

Covered: after aliases and .forward, a mailbox goes to mailbox_transport (the other agent's result is the
recipient's, about the address passed), else into mailbox_command (local's command environment with HOME and SHELL,
no ENVID as in Postfix 3.7, exit statuses mapped as for |commands), else the Maildir; a recipient that is no local
user goes to fallback_transport, else to the address luser_relay expands to (a local one delivered here, a relay
address that is the recipient itself or unknown in turn refused 5.1.1), else bounces; a transport that is not there
defers 4.3.0 (deliver_pass's "mail transport unavailable"); config refuses a transport that does not exist, local
itself and an unknown luser_relay macro, naming the key.
"""
from __future__ import annotations

import dataclasses

import pytest

from mailflow.config import ConfigError, config_from_dict
from mailflow.local_macros import check_local_macros, expand_local_macros
from mailflow.model import DeliveryReport, DeliveryRequest, Outcome
from mailflow.stages.qmgr.notices import _notice_recipient as notice_recipient
from mailflow.transports.discard import DiscardTransport
from mailflow.transports.error import ErrorTransport
from tests.component.test_local_commands import RECORD, environment, maildir, make_transport, request
from tests.component.test_local_commands import scripts  # noqa: F401 (fixture)


class Recording:
    """A stand-in delivery agent that keeps the requests it is given and answers `outcome`."""

    program = "lmtp"

    def __init__(self, outcome: Outcome = Outcome.SENT, dsn: str = "2.0.0", text: str = "250 2.0.0 Saved"):
        self.requests: list[DeliveryRequest] = []
        self.answer = (outcome, dsn, text)

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        self.requests.append(request)
        return DeliveryReport.uniform(request.recipients, *self.answer, relay="peer[127.0.0.1]:24")


def routed(base, aliases: str = "", peers=None, **local):
    t = make_transport(base, aliases, **local)
    t._peers = peers or {}
    return t


async def test_mailbox_command_gets_the_message_with_the_users_environment(scripts, tmp_path):  # noqa: F811
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    t = routed(tmp_path, mailbox_command=f"{s} -a \"$RECIPIENT\"")
    req = dataclasses.replace(request("Bob+Tag@example.test"), envid="env-1")
    [result] = (await t.deliver(req)).results
    assert (result.outcome, result.dsn, result.text) == (Outcome.SENT, "2.0.0",
                                                         f"delivered to command: {s} -a \"$RECIPIENT\"")
    env = environment(scripts.read("env"))
    home = str(tmp_path / "mail" / "bob")
    assert {k: env[k] for k in ("USER", "LOCAL", "EXTENSION", "RECIPIENT", "HOME", "SHELL")} == {
        "USER": "bob", "LOCAL": "bob+tag", "EXTENSION": "tag", "RECIPIENT": "Bob+Tag@example.test", "HOME": home,
        "SHELL": "/bin/sh"}
    assert "ENVID" not in env  # Postfix 3.7's local(8) exports none (3.9 does)
    assert "Delivered-To: Bob+Tag@example.test\n" in scripts.read("stdin")
    assert maildir(tmp_path, "bob") == []  # the command is the mailbox


@pytest.mark.parametrize("status, outcome, dsn", [(75, Outcome.DEFERRED, "4.3.0"), (67, Outcome.BOUNCED, "5.1.1")])
async def test_mailbox_command_exit_status_maps_as_a_commands(scripts, tmp_path, status, outcome, dsn):  # noqa: F811
    s = scripts.script("fail.sh", f"echo no way\nexit {status}\n")
    [result] = (await routed(tmp_path, mailbox_command=str(s)).deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn) == (outcome, dsn) and "no way" in result.text


async def test_a_forward_naming_the_user_runs_the_mailbox_command_and_aliases_go_first(scripts, tmp_path):  # noqa
    s = scripts.script("record.sh", RECORD.format(out=scripts.out))
    t = routed(tmp_path, "postmaster: alice\n", mailbox_command=str(s))
    [result] = (await t.deliver(request("postmaster@example.test"))).results
    assert result.outcome is Outcome.SENT and environment(scripts.read("env"))["USER"] == "alice"
    assert result.expanded == "alice@example.test"  # logged about the member, as local(8) logs it


async def test_mailbox_transport_takes_the_mailbox_and_its_result_is_the_recipients(tmp_path):
    peer = Recording()
    t = routed(tmp_path, "info: alice\n", peers={"lmtp": peer}, mailbox_transport="lmtp:unix:private/dovecot-lmtp",
               mailbox_command="/bin/false")
    [result] = (await t.deliver(request("info@example.test"))).results
    [passed] = peer.requests
    assert passed.nexthop == "unix:private/dovecot-lmtp"
    assert [r.address for r in passed.recipients] == ["alice@example.test"]
    assert (result.outcome, result.text, result.relay) == (Outcome.SENT, "250 2.0.0 Saved", "peer[127.0.0.1]:24")
    assert result.recipient.address == "info@example.test" and result.expanded == "alice@example.test"
    assert result.program == "lmtp"  # logged under the agent that delivered it, as Postfix's postfix/lmtp
    assert maildir(tmp_path, "alice") == []


class SaysFinal(Recording):
    """A stand-in that says its results are final (DeliveryRequest.settled) before it reports, as the LMTP client
    does at each 250 after DATA."""

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        report = await super().deliver(request)
        request.settled(report.results)
        return report


@pytest.mark.parametrize("aliases, told", [("info: alice\n", ["info@example.test"]), ("info: \\info, bob\n", [])])
async def test_a_pass_s_word_that_its_result_is_final_is_the_recipient_s_only_when_it_is_its_one_destination(
        tmp_path, aliases, told):
    """What the agent passed to says is final (qmgr records it if a stop cuts the delivery off) is made the
    recipient's, as its result is, when the pass is the recipient's one destination: it was about the address
    passed (alice), which qmgr does not take for info. One of several destinations says nothing: `info: \\info,
    bob` passed info's own address, and qmgr took its word for the recipient info with bob's copy still to come
    (local(8) passes with offset -1)."""
    peer = SaysFinal()
    t = routed(tmp_path, aliases, peers={"lmtp": peer}, mailbox_transport="lmtp:unix:private/dovecot-lmtp")
    settled: list = []
    await t.deliver(dataclasses.replace(request("info@example.test"), on_settled=settled.extend))
    assert len(peer.requests) == 1 + (not told)
    assert [(r.recipient.address, r.program) for r in settled] == [(address, "lmtp") for address in told]


async def test_mailbox_transport_without_nexthop_uses_locals_and_takes_unknown_users_too(tmp_path):
    """local(8)'s mailbox.c passes before it looks the user up: Dovecot decides who exists."""
    peer = Recording(Outcome.BOUNCED, "5.1.1", "550 5.1.1 <ghost@example.test> User doesn't exist")
    t = routed(tmp_path, peers={"lmtp": peer}, mailbox_transport="lmtp", luser_relay="alice")
    [result] = (await t.deliver(request("ghost@example.test"))).results
    assert peer.requests[0].nexthop == "mx.example.test"
    assert (result.outcome, result.dsn, result.expanded) == (Outcome.BOUNCED, "5.1.1", "")


async def test_a_pass_to_a_transport_that_is_not_there_defers(tmp_path):
    [result] = (await routed(tmp_path, mailbox_transport="lmtp").deliver(request("bob@example.test"))).results
    assert (result.outcome, result.dsn, result.text) == (Outcome.DEFERRED, "4.3.0", "mail transport unavailable")


async def test_fallback_transport_takes_unknown_users_only(tmp_path):
    t = routed(tmp_path, peers={"error": ErrorTransport()}, fallback_transport="error:5.1.1 no such account",
               luser_relay="alice")
    [ghost, bob] = (await t.deliver(dataclasses.replace(
        request("ghost@example.test"), recipients=(request("ghost@example.test").recipients[0],
                                                   dataclasses.replace(request("bob@example.test").recipients[0],
                                                                       index=1))))).results
    assert (ghost.outcome, ghost.dsn, ghost.text) == (Outcome.BOUNCED, "5.1.1", "no such account")
    assert bob.outcome is Outcome.SENT and len(maildir(tmp_path, "bob")) == 1


async def test_luser_relay_delivers_an_unknown_user_to_the_expanded_local_address(tmp_path):
    t = routed(tmp_path, "list: ghost, bob\n", luser_relay="alice+${user}${extension?-x}")
    [result] = (await t.deliver(request("ghost+tag@example.test"))).results
    assert (result.outcome, result.text) == (Outcome.SENT, "delivered to maildir")
    [copy] = maildir(tmp_path, "alice")
    assert b"Delivered-To: ghost+tag@example.test\n" in copy  # local(8)'s: the recipient it was given
    [result] = (await t.deliver(request("list@example.test"))).results  # an alias member, as local(8)
    assert result.outcome is Outcome.SENT and len(maildir(tmp_path, "alice")) == 2


async def test_luser_relay_to_the_recipient_itself_or_to_an_unknown_address_bounces(tmp_path):
    for relay in ("$user", "ghost2"):
        [result] = (await routed(tmp_path, luser_relay=relay).deliver(request("ghost@example.test"))).results
        assert (result.outcome, result.dsn) == (Outcome.BOUNCED, "5.1.1"), relay
        assert result.text in ('unknown user: "ghost"', 'unknown user: "ghost2"'), result


def recording_forwards(transport) -> list:
    """The addresses of each forwarded copy `transport` queues from now on (none is queued; each gets id Q2)."""
    sent = []

    async def forward(request, recipient, addresses, content, sender=None):
        sent.append(addresses)
        return "Q2"
    transport._forward = forward
    return sent


async def test_luser_relay_resends_to_a_remote_address(tmp_path):
    t = routed(tmp_path, luser_relay="${user}${extension?+x}.$local.${extension:none}@elsewhere.test")
    sent = recording_forwards(t)
    [result] = (await t.deliver(request("Ghost@example.test"))).results
    [result2] = (await t.deliver(request("ghost+Tag@example.test"))).results
    assert result.outcome is result2.outcome is Outcome.SENT
    # a local part that ends with a dot is no dot-atom: written in quotes, as Postfix's quote_822_local writes it
    assert sent == [("ghost.ghost.none@elsewhere.test",), ('"ghost+x.ghost+tag."@elsewhere.test',)]


async def test_discard_as_fallback_transport(tmp_path):
    t = routed(tmp_path, peers={"discard": DiscardTransport()}, fallback_transport="discard:unknown users")
    [result] = (await t.deliver(request("ghost@example.test"))).results
    assert result.outcome is Outcome.SENT


@pytest.mark.parametrize("local, message", [
    ({"mailbox_transport": "dovecot:unix:private/lmtp"}, "local.mailbox_transport: 'dovecot' is not a transport"),
    ({"fallback_transport": "local"}, "local.fallback_transport: 'local': local would hand the mailbox to itself"),
    ({"luser_relay": "admin+$usr"}, "local.luser_relay: unknown macro $usr"),
])
def test_config_refuses_what_cannot_work(local, message):
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"local": local})
    assert message in str(caught.value)


def test_config_takes_a_pipe_service_as_mailbox_transport():
    config = config_from_dict({"local": {"mailbox_transport": "dovecot"},
                               "pipe": {"dovecot": {"argv": ["/usr/lib/dovecot/dovecot-lda", "-d", "${user}"]}}})
    assert config.local.mailbox_transport == "dovecot"


async def test_a_luser_relay_loop_through_an_alias_ends_as_postfix_ends_it(tmp_path):
    """boss unknown, luser_relay admin, admin an alias of boss (seen with a private Postfix 3.7): through team, the
    relay's alias is not expanded again under itself (exp_from), so admin is a user, unknown: 5.1.1 'unknown user:
    "admin"' (to=<admin>, orig_to=<team>) and the other member is delivered; boss itself comes back to boss through
    the alias and local(8)'s been_here ends it there, with nothing delivered (Postfix logs nothing for it)."""
    t = routed(tmp_path, "admin: boss\nteam: ghost, alice\n", luser_relay="admin")
    [team] = (await t.deliver(request("team@example.test"))).results
    assert (team.outcome, team.dsn, team.expanded) == (Outcome.BOUNCED, "5.1.1", "admin@example.test")
    assert team.text.startswith('unknown user: "admin"') and len(maildir(tmp_path, "alice")) == 1
    [ghost] = (await t.deliver(request("ghost@example.test"))).results
    assert (ghost.outcome, ghost.text, ghost.expanded) == (Outcome.BOUNCED, 'unknown user: "admin"',
                                                           "admin@example.test")
    [boss] = (await t.deliver(request("boss@example.test"))).results
    assert boss.outcome is Outcome.SENT and len(maildir(tmp_path, "alice")) == 1


async def test_a_failure_expanding_one_recipient_defers_that_recipient_only(tmp_path):
    """What no DeliveryError says (a bug) defers its recipient 4.3.0, as Postfix's qmgr defers one an agent died
    on; the results of the others stand, so they are not delivered again at every retry."""
    t = routed(tmp_path)

    def broken(addr, **_):
        if addr.startswith("ghost"):
            raise RecursionError("maximum recursion depth exceeded")
        return real(addr, **_)
    real, t._expander.expand_recipient = t._expander.expand_recipient, broken
    two = dataclasses.replace(request("alice@example.test"), recipients=(
        request("alice@example.test").recipients[0],
        dataclasses.replace(request("ghost@example.test").recipients[0], index=1)))
    [alice, ghost] = (await t.deliver(two)).results
    assert alice.outcome is Outcome.SENT and len(maildir(tmp_path, "alice")) == 1
    assert (ghost.outcome, ghost.dsn, ghost.text) == (Outcome.DEFERRED, "4.3.0", "unknown mail transport error")


def two_recipients(first: str, second: str) -> DeliveryRequest:
    return dataclasses.replace(request(first), recipients=(
        request(first).recipients[0], dataclasses.replace(request(second).recipients[0], index=1)))


async def test_mailbox_transport_gets_one_copy_per_user_per_request(tmp_path):
    """info (an alias of alice) and alice in one request: one LMTP delivery, as one Maildir copy without the
    setting (local(8)'s been_here "mailbox"); both recipients get its result."""
    peer = Recording()
    t = routed(tmp_path, "info: alice\n", peers={"lmtp": peer}, mailbox_transport="lmtp")
    [info, alice] = (await t.deliver(two_recipients("info@example.test", "alice@example.test"))).results
    assert [[r.address for r in p.recipients] for p in peer.requests] == [["alice@example.test"]]
    assert (info.outcome, info.text, info.relay) == (alice.outcome, alice.text, alice.relay) == (
        Outcome.SENT, "250 2.0.0 Saved", "peer[127.0.0.1]:24")
    assert (info.recipient.address, alice.recipient.address) == ("info@example.test", "alice@example.test")


async def test_mailbox_command_runs_once_per_user_per_request(scripts, tmp_path):  # noqa: F811
    s = scripts.script("count.sh", f"echo run >> {scripts.out}/runs\ncat > /dev/null\n")
    t = routed(tmp_path, "info: alice\n", mailbox_command=str(s))
    [info, alice] = (await t.deliver(two_recipients("info@example.test", "alice@example.test"))).results
    assert info.outcome is alice.outcome is Outcome.SENT
    assert scripts.read("runs") == "run\n"


class Notifying(Recording):
    """A peer that offered DSN and took NOTIFY: it says it reports success itself."""

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        report = await super().deliver(request)
        return DeliveryReport(tuple(dataclasses.replace(r, next_hop_notifies=True) for r in report.results))


async def test_an_alias_member_is_passed_on_without_notify_success_and_the_expansion_reports_it(tmp_path):
    """alias.c passes NOTIFY on without SUCCESS (SUCCESS alone: NEVER): the alias's own "expanded" notice is the
    success notice, so the peer's next_hop_notifies must not suppress it. A recipient passed as it is keeps both."""
    peer = Notifying()
    t = routed(tmp_path, "info: alice\n", peers={"lmtp": peer}, mailbox_transport="lmtp")
    for rcpt, notify, passed, notifies in [("info", "SUCCESS", "NEVER", False),
                                           ("info", "SUCCESS,FAILURE", "FAILURE", False),
                                           ("bob", "SUCCESS", "SUCCESS", True)]:
        req = request(f"{rcpt}@example.test")
        req = dataclasses.replace(req, recipients=(dataclasses.replace(req.recipients[0], notify=notify),))
        [result] = (await t.deliver(req)).results
        assert peer.requests[-1].recipients[0].notify == passed, rcpt
        assert result.recipient.notify == notify and result.next_hop_notifies is notifies, rcpt
        told = notice_recipient(result, 0)  # the alias's notice: expanded, about the alias, whatever the peer was
        expected = ("expanded", "alias expanded", "") if rcpt == "info" else ("relayed", result.text, "peer")
        assert (told.action, told.diagnostic, told.remote_mta) == expected, rcpt


class Silent(Recording):
    """A peer whose report holds no result for the address it was given."""

    async def deliver(self, request: DeliveryRequest) -> DeliveryReport:
        self.requests.append(request)
        return DeliveryReport(())


async def test_a_peer_that_reports_no_result_defers_that_recipient_only(tmp_path, caplog):
    """deliver_pass's 4.3.0 when the other agent's answer is broken, logged about that transport."""
    t = routed(tmp_path, peers={"lmtp": Silent()}, fallback_transport="lmtp")
    [ghost, bob] = (await t.deliver(two_recipients("ghost@example.test", "bob@example.test"))).results
    assert (ghost.outcome, ghost.dsn, ghost.text) == (Outcome.DEFERRED, "4.3.0", "unknown mail transport error")
    assert ghost.recipient.address == "ghost@example.test"
    assert bob.outcome is Outcome.SENT and len(maildir(tmp_path, "bob")) == 1
    assert "Q1: transport lmtp gave no result for <ghost@example.test>" in caplog.messages


@pytest.mark.parametrize("template, values, expanded", [
    ("${extension?+${extension}}", {"extension": "tag"}, "+tag"),  # mac_expand expands the text it picks
    ("${extension?+${extension}}", {}, ""),
    ("a$(extension:$user.x)b", {"user": "ghost"}, "aghost.xb"),
    ("${user}$$", {"user": "ghost"}, "ghost$"),
    # Postfix 3's mac_expand: {text} operands, whitespace around them ignored, and relational expressions
    ("${extension?{+$extension}:{-none}}", {"extension": "tag"}, "+tag"),
    ("${extension?{+$extension}:{-none}}", {}, "-none"),
    ("${extension ? {x} : y}", {}, " y"),  # (a text not in braces is taken as it is)
    ("${extension?a:b}", {"extension": "t"}, "a:b"),  # (Postfix 2's form: all of it, ':' too)
    ("${{$user} == {ghost}?{g}:{o}}${{$user}=={ghost}}[${{$user}!={ghost}}]", {"user": "ghost"}, "gtrue[]"),
    ("${{$extension} < {9} ? {low} : {high}}", {"extension": "10"}, "high"),  # (numbers: 10 > 9)
    ("${{$extension} < {9} ? {low} : {high}}", {"extension": "a10"}, "high"),  # (text: "a10" > "9")
])
def test_luser_relay_macros_expand_the_conditional_text(template, values, expanded):
    assert expand_local_macros(template, values) == expanded


@pytest.mark.parametrize("template, message", [
    ("${extension?$usr}", "unknown macro $usr"),  # the text is checked too
    ("${extension?x", "'${extension?x': a '$' that starts no macro"),
    ("a$", "'a$': a '$' that starts no macro"),
    ("${extension?{x}:{$usr}}", "unknown macro $usr"),  # both texts, and both sides of a relation
    ("${{$usr} == {x}}", "unknown macro $usr"),
    ("${{$user} =~ {x}}", "one of ==, !=, <, <=, >=, > expected"),
    ("${{$user} == x}", "'{text}' expected after '=='"),
    ("${extension?{x} y}", "':' expected after '}'"),
    ("${extension?{x}:{y}z}", "unexpected text after '}'"),
    ("${extension?{x}", "not closed"),
])
def test_luser_relay_macros_check_the_conditional_text(template, message):
    with pytest.raises(ValueError) as caught:
        check_local_macros(template)
    assert message in str(caught.value)


async def test_luser_relay_macros_take_the_unquoted_local_part(tmp_path):
    """local(8) expands the internal form of the address (`"ghost+a b"@…`: extension `a b`), not its quotes."""
    t = routed(tmp_path, luser_relay="relay+${extension}@elsewhere.test")
    sent = recording_forwards(t)
    [result] = (await t.deliver(request('"ghost+a b"@example.test'))).results
    assert result.outcome is Outcome.SENT and sent == [("relay+a b@elsewhere.test",)]
