"""smtpd restriction lists: Postfix's SMTPD_ACCESS_README vocabulary, evaluated in Postfix's order.

What it owns
- The evaluation of the vocabulary in `mailflow.restriction_vocabulary` (the names, their arguments and
  `check_item`, with which config validates every item at start).
- `Restrictions(config, smtpd, rewriter, mapper, resolver, tables)`: the lists of one `SmtpdConfig` (a
  listener may have its own), with their tables and policy clients opened once.
- `check_rcpt(facts)`, `check_data(facts)`, `check_end_of_data(facts)`, `check_etrn(facts)` -> `Reply | None`
  (None: go on); `await preload()`: their file-backed tables read off the event loop (before a listener serves);
  `check_early(stage, facts)`: the client, helo or sender list on its own (delay_reject false);
  `check_data_command`, `check_content`: whether the data list, the end_of_data list has anything to evaluate
  (the handler runs the data list at DATA or the first BDAT, before any content); `close()`: the policy
  services' kept connections (policy.py) are closed.
- The restrictions that ask the DNS are dns_checks.py's (reject_rbl_client, reject_rhsbl_*, permit_dnswl_client,
  permit_rhswl_client, the unknown client name, HELO name and address domain checks; a list's refusal is worded
  by rbl_replies.py: default_rbl_reply, rbl_reply_maps, the list's TXT reason) and server_checks.py's
  (check_*_{mx,ns,a}_access: this module asks the table with each server it names, and refuses an OK as Postfix's
  forbid_allowlist does, 451 4.3.5, as for check_reverse_client_hostname_access; permit_mx_backup). A permit (the
  permit items, an access value OK, RELAY, DISCARD or all digits) is logged when log_access_permit_actions names
  it, as Postfix's smtpd_acl_permit logs it;
  the inbound filters' (docs/filtering.md):
  check_greylist (450 4.2.0 as a DEFER_IF_PERMIT, postgrey's answer; mailflow.filters.greylist),
  reject_spf_fail (550 5.7.23) and, at end of data, reject_dmarc_policy (p=reject: 550 5.7.1; p=quarantine:
  HOLD; a DMARC temperror under either: 450 4.7.1). Access FILTER transport:nexthop marks the message for that
  after-queue filter.
- reject_unverified_recipient and reject_unverified_sender ask the verifier (mailflow.stages.verify), as
  Postfix's reject_unverified_address: `450 4.1.1 <a>: Recipient address rejected: unverified address: <why>` as a
  DEFER_IF_PERMIT (the probe is under way, deferred, or bounced with the default reject code 450), `550 5.1.1
  ... undeliverable address: <why>` with a 5xx reject code; a deliverable address has no opinion.
- The items that ask the session (Postfix smtpd_check.c's words and codes): reject_unauth_pipelining (503 5.5.0,
  `facts.ill_pipelining`: the violation protocol.py logs), reject_plaintext_session (plaintext_reject_code,
  `facts.encrypted`), reject_multi_recipient_bounce (multi_recipient_bounce_reject_code 550, 5.5.3: the null
  sender, at an RCPT after one was accepted), permit_auth_destination (and reject/defer_unauth_destination,
  the DNS allowlists' guard at RCPT: Rewriter's authorized_destination, which refuses a routed recipient as
  Postfix's), permit_naked_ip_address (deprecated: logged at each use); reject_unlisted_sender
  (`_unlisted` asked for the sender: 550 5.1.0 `Sender address rejected`; also implied after the sender list
  with smtpd_reject_unlisted_sender, unless that list refused; `_listed`: it and reject_unlisted_recipient, items
  or implied, check nothing under receive_override_options = no_unknown_recipient_checks, nor an address the
  command checked already), the reject_*sender_login_mismatch items
  (auth.SenderLogins.refusal with sender_login_maps, asked the sender as resolved; the one check the [smtpd]
  setting uses at MAIL) and check_sasl_access (key: the SASL login); the SASL ones are ignored (logged) without
  AUTH on the listener.

Evaluation (delay_reject true: Postfix with smtpd_delay_reject = yes): at RCPT the client, helo, sender, relay and
recipient lists run in that order (delay_reject false: the handler runs the first three at connect or XCLIENT,
HELO/EHLO and MAIL with `check_early`, carrying their DEFER_IF_PERMIT in `facts.defer_if_permit`, and RCPT runs
the relay and recipient lists only; an action that marks the message met before MAIL is skipped and logged, as
Postfix's not_in_client_helo does); each list stops at its first PERMIT (the next list still runs) or refusal (the
answer); an item with nothing to say (DUNNO, or missing facts such as no HELO yet) passes to the next.
warn_if_reject makes its next item (all of it: a class goes on past its warnings) refuse nothing: each refusal or
DEFER_IF_PERMIT it would have made is logged `reject_warning: …` instead (`facts.warn_if_reject`, Postfix's
recursion level); an access table that cannot answer (451 4.3.5, the value Postfix's check_access gives
check_table_result) is a verdict like any other and is only warned of; a configuration error (a reply marked
`server_fault`: Postfix's reject_server_error) and a lookup that cannot be retried (reject_dict_retry) stay refusals.
Then, unless refused or deferred (DEFER_IF_PERMIT), `reject_unlisted_recipient` is implied
(smtpd_reject_unlisted_recipient). The data list runs at DATA (or a first BDAT) before any content, the
end_of_data list at the end of the message;
there only a single recipient is "the recipient". A restriction class (`[smtpd] restriction_classes`,
smtpd_restriction_classes) named in a list runs its own list as one item: its PERMIT or refusal is the item's.
An access value that is no action is a list of restrictions and classes, run the same way (Postfix's
check_table_result), its `reject` naming what the table was asked about. Access-table DISCARD permits and
marks the message to be discarded (no further checks); HOLD, FILTER, PREPEND (not at the end of data: ignored),
REDIRECT and BCC mark it and go on; an all-digit value is OK; WARN and INFO log and go on (Postfix). DISCARD,
HOLD, FILTER, REDIRECT and BCC are logged where they are met, as Postfix's check_table_result logs them
(`NOQUEUE: hold: RCPT from host[ip]: <s@d>: Sender address triggers HOLD action; from=<…> to=<…> …`, the
transaction's queue id once it has one): HOLD once per message, the others each time. Marks live in
`facts.marks`, one per message (`marks.hold_logged`: the hold's line is written). DEFER_IF_PERMIT and
DEFER_IF_REJECT hold for the command that met them (`facts`): its verdict, permit or refusal, is turned into a
deferral at the end (`_conditional_deferrals`); a DEFER_IF_REJECT only within its step (RCPT_STEPS: the client,
helo and sender lists each, the relay and recipient lists together, as Postfix resets it per stage). An
enhanced status code an action gives is fitted to what it refuses (`dsn_fix`).

At ETRN (`check_etrn`, Postfix's smtpd_check_etrn) the client and helo lists run (delay_reject true), then the
etrn list, whose check_etrn_access looks up the site (`facts.etrn_domain`); DEFER_IF_PERMIT and DEFER_IF_REJECT
work as at RCPT (ETRN_STEPS); an action that marks a message is skipped there (logged), as Postfix skips it.

Postfix 3.7's old items: the old names of current items are taken as those (restriction_vocabulary.OLD_NAMES);
check_relay_domains (a client whose verified name is in relay_domains, or an authorized destination; refused with
relay_domains_reject_code), permit_inet_interfaces (`facts.on_this_host`: the connection's own address, not
XCLIENT's) and reject_maps_rbl (reject_rbl_client for each of maps_rbl_domains), the going-away warnings logged
once. The refusals' codes are Postfix's settings: access_map_reject_code and access_map_defer_code (an access
table's or policy server's REJECT and DEFER*), reject_code and defer_code (the items), relay_domains_reject_code,
invalid_hostname_reject_code, non_fqdn_reject_code; check_sender_access asks the null sender as
null_access_lookup_key.

Failure behaviour: an access table that cannot answer gives `451 4.3.5 <name>: X rejected: Server configuration
error` (logged; warned of under warn_if_reject, as Postfix's check_access); an action mailflow does not know (an
access value naming an undefined class or a lookup table, or lists nested deeper than MAX_DEPTH: a loop through
tables) gives the same reply as the server's fault (never a warning); a FILTER, PREPEND, REDIRECT or BCC
without the argument it takes is ignored and an empty action is OK (both logged; Postfix); a policy server that
cannot be asked gives `policy_service_default_action` (451 4.3.5 Server configuration problem); a DNSBL that
cannot be asked counts as not listed (logged); reject_unknown_(reverse_)client_hostname with a DNS failure defers
at once (450, whatever unknown_client_reject_code);
reject_unknown_helo_hostname's DNS failure is a DEFER_IF_PERMIT (450 4.7.1, unknown_helo_hostname_tempfail_action),
reject_unknown_sender_domain's and reject_unknown_recipient_domain's too (450 4.1.8, 450 4.1.2 `Domain not found`,
unknown_address_tempfail_action); a DNS allowlist
(permit_dnswl_client, permit_rhswl_client) or permit_mx_backup that cannot be asked permits nothing and makes a
later 5xx refusal a DEFER_IF_REJECT 450; an OK from a server access check or check_reverse_client_hostname_access
is refused 451 4.3.5 (forbid_allowlist, logged); a greylist database fault lets mail pass (logged).
Nothing here raises for a client's input.
"""
from __future__ import annotations

import logging
import re
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Collection, Sequence

from mailflow import address, status
from mailflow.address import client_ip
from mailflow.dsn_parameters import xtext_encode
from mailflow.errors import LookupRetry
from mailflow.logs import SmtpdLog, printable
from mailflow.restriction_vocabulary import (ACCESS_CHECKS, ALL_PERMITS, CLIENT_CERT_PERMITS, CONDITIONAL_DEFERRALS,
                                             DNSWL_CHECKS, KNOWN,
                                             LOGGED_PERMITS, NEEDS_FILTER, PERMIT_VALUES_TEXT, RCPT_STAGES,
                                             REVERSE_CLIENT_ACCESS, RHSBL_CHECKS, SENDER_LOGIN_CHECKS,
                                             SERVER_ACCESS_CHECKS, STAGES, WARN_IF_REJECT, WITH_ARGUMENT, check_item,
                                             is_logged_permit, split_item)
from mailflow.stages.smtpd.auth import SenderLogins
from mailflow.routing.rewrite import unknown_reject_codes
from mailflow.stages.smtpd.dns_checks import TEMPUNAVAIL, UNAVAILABLE, DnsChecks, helo_literal_refusal
from mailflow.stages.smtpd.server_checks import ServerChecks
from mailflow.stages.smtpd.policy import PolicyError, policy_service
from mailflow.stages.smtpd.rbl_replies import Listed, RblReplies
from mailflow.stages.smtpd.tls import ClientCert
from mailflow.stages.verify import Status as VerifyStatus
from mailflow.stages.verify import Verifier
from mailflow.syntax import is_postfix_ipv4, split_leading_dsn
from mailflow.tables import TableCache, find
from mailflow.tables.search import EXTERNAL_FIRST, address_search
from mailflow.tables.networks import NetworkList

if TYPE_CHECKING:  # (the filters' libraries load only when a filter is configured)
    from mailflow.filters.senderauth import Verdicts

log = logging.getLogger("mailflow.smtpd")

PERMIT = "PERMIT"  # an item's answer: stop this list, go on with the next
NULL_SENDER_KEY = "<>"  # smtpd_null_access_lookup_key's default (smtpd.null_access_lookup_key)
SUBJECT = {  # a list's stage -> how its refusals name what they looked at
    "client": "Client host", "helo": "Helo command", "sender": "Sender address",
    "relay": "Recipient address", "recipient": "Recipient address",
    "data": "Data command", "end_of_data": "End-of-data",
    "mail": "Sender address",  # (the in-process policy hook's MAIL stage: handler.py)
    "etrn": "Etrn command",
    "sasl": "SASL login name",  # (check_sasl_access)
}
# The steps of the RCPT lists: a DEFER_IF_REJECT holds until the end of its own (Postfix's smtpd_check_client,
# _helo, _mail, then the relay and recipient lists together, each starting with SMTPD_CHECK_RESET), where a
# DEFER_IF_PERMIT holds to the end of them all. RCPT_STAGES in those steps: client, helo, sender; relay + recipient.
RCPT_STEPS = (*((stage,) for stage in RCPT_STAGES[:-2]), RCPT_STAGES[-2:])
ETRN_STEPS = (("client",), ("helo",), ("etrn",))  # (smtpd_check_etrn: smtpd_check_client, _helo, then its own)
MAX_DEPTH = 100  # lists within lists (classes, access values) beyond which a table's value is refused (Postfix's)
VALUE_LIST_CACHE = 1000  # access values kept read as lists (the table is emptied when full)
PROTOCOL_STATE = {"data": "DATA", "end_of_data": "END-OF-MESSAGE"}
_HEADER_FIELD = re.compile(r"[!-9;-~]+:[ \t]*[^\r\n]*")  # PREPEND's argument: one header field, unfolded
_NUMERIC_ACTION = re.compile(r"([45][0-9][0-9])(?:\s+(.*))?", re.S)  # the code; the rest: split_leading_dsn


# ---------------------------------------------------------------------------------------------- facts


@dataclass
class Marks:
    """What restrictions decided for the whole message: discard or hold it (the logged reason), send it to an
    after-queue filter (an access FILTER action: transport:nexthop), prepend header fields to it, send it to
    another recipient instead (REDIRECT) or a copy to one more (BCC)."""

    discard: str | None = None
    hold: str | None = None
    filter: str | None = None
    prepend: list[str] = field(default_factory=list)  # access PREPEND: header fields for the message, in order
    redirect: str | None = None  # access REDIRECT: the one recipient the message goes to instead
    bcc: list[str] = field(default_factory=list)  # access BCC: more recipients for a copy, each BCC kept (Postfix 3.2+)
    hold_logged: bool = False  # the hold's line was written where it was met (an access action's, a milter's)


@dataclass
class Facts:
    """What a restriction may look at. `sender` None: no MAIL yet; "" the null sender."""

    client_addr: str
    client_port: str = "unknown"  # as Postfix writes it: SessionState.port_text
    server_addr: str = ""  # the address and port of this server the client connected to
    server_port: int | str | None = None  # (None: unknown, or XCLIENT DESTPORT=[UNAVAILABLE]; str: DESTPORT's digits)
    client_name: str = "unknown"
    # The client's verified name and reverse (PTR) name given without the DNS (None: the DNS is asked): XCLIENT
    # NAME's, REVERSE_NAME's ([UNAVAILABLE]: none, [TEMPUNAVAIL]: the DNS could not tell), or [UNAVAILABLE] under
    # peername_lookup = no (smtpd_peer.c)
    given_name: str | None = None
    given_reverse_name: str | None = None
    names_addr: str = ""  # whose names the DNS is asked for ("": client_addr; after XCLIENT ADDR: the front end's)
    helo: str = ""
    sender: str | None = None
    recipient: str = ""
    recipient_count: int = 0
    etrn_domain: str = ""  # at ETRN: the site the client asks for (as it wrote it, without a leading @ or #)
    authenticated: bool = False
    sasl_method: str = ""
    sasl_username: str = ""
    protocol: str = "ESMTP"
    size: int = 0
    instance: str = ""
    queue_id: str = ""  # the transaction's, from its first accepted recipient on ("" before)
    # the command answered when it is none of RCPT, DATA, END-OF-MESSAGE (CONNECT, XCLIENT, HELO, EHLO, MAIL: the
    # lists run early): what log lines and policy requests name, as Postfix's state->where ("": the stage's)
    command: str = ""
    encryption_protocol: str = ""
    encryption_cipher: str = ""
    client_cert: ClientCert | None = None  # the TLS client's certificate (tls_ask_ccert), None: none sent
    marks: Marks = field(default_factory=Marks)
    memo: dict = field(default_factory=dict)  # the session's answers of lookups (client name, SPF), by question
    auth: Verdicts | None = None  # end_of_data: the message's sender authentication verdicts
    # DEFER_IF_PERMIT and DEFER_IF_REJECT, for this command only: the reply if the verdict is a permit; the reply
    # if it is a 5xx refusal
    defer_if_permit: status.Reply | None = None
    defer_if_reject: status.Reply | None = None
    # the session's DEFER_IF_PERMIT after its last sender list (SessionState.defer_if_permit_sender): in, and out
    # once this command ran that list
    defer_if_permit_sender: status.Reply | None = None
    depth: int = 0  # how many lists (a stage's, restriction classes', access values') are being evaluated
    # warn_if_reject met at this depth (0: none): refusals until its next item is done are only logged
    warn_if_reject: int = 0
    # raised under warn_if_reject, to be logged (None: none yet; made on first use, as listed_checked: the hot path)
    warned_deferrals: list[status.Reply] | None = None
    ill_pipelining: bool = False  # the session broke RFC 2920's pipelining rules (reject_unauth_pipelining)
    encrypted: bool = False  # the session is under TLS (reject_plaintext_session)
    on_this_host: bool = False  # the connection's client (not XCLIENT's) is this host (permit_inet_interfaces)
    # "sender", "recipient": the unknown-user check made for it in this command, not under warn_if_reject (Postfix's
    # sender_rcptmap_checked, recipient_rcptmap_checked): not made again, by an item or the implied check
    listed_checked: set[str] | None = None

    @property
    def client(self) -> str:
        """`name[address]`, as Postfix names the client in its replies and log lines."""
        return f"{self.client_name}[{self.client_addr}]"

    def raise_defer_if_permit(self, reply: status.Reply) -> None:
        """A DEFER_IF_PERMIT met: the first one is kept (Postfix's defer_if); under warn_if_reject it is only
        held in `warned_deferrals` for its reject_warning line, whatever is pending (Postfix's DEFER_IF_PERMIT
        macros call smtpd_check_reject then)."""
        if self.warn_if_reject:
            if self.warned_deferrals is None:
                self.warned_deferrals = []
            self.warned_deferrals.append(reply)
        elif self.defer_if_permit is None:
            self.defer_if_permit = reply


# ---------------------------------------------------------------------------------------------- key orders


def domain_keys(name: str) -> list[str]:
    """A host or domain name, then its parent domains (parent_domain_matches_subdomains style)."""
    name = name.lower().rstrip(".")
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels)) if labels[i]]


def client_keys(addr: str, hostname: str) -> list[str]:
    """check_client_access: the hostname and its parents (a client without a name is `unknown`, a key Postfix
    asks too), the address, its network prefixes (`192.168.1`, `192.168`, `192` / `2001:db8:0:0:0:0:0`, …)."""
    keys = domain_keys(hostname) if hostname else []
    ip = client_ip(addr)
    if ip is None:
        return keys + ([addr] if addr else [])
    keys.append(str(ip))
    if ip.version == 4:
        octets = str(ip).split(".")
        keys += [".".join(octets[:n]) for n in range(3, 0, -1)]
    else:
        groups = [format(int(g, 16), "x") for g in ip.exploded.split(":")]
        keys += [":".join(groups[:n]) for n in range(7, 0, -1)]
    return keys


def naked_ip_address(helo: str, invalid_code: int = 501):
    """Postfix 3.7's permit_naked_ip_address (deprecated, logged at each use): a HELO name of digits, dots and
    colons only is a permit when it is an IPv4 address as Postfix's valid_ipv4_hostaddr takes one (leading zeros
    allowed; a name with a colon never is: without Postfix's `IPv6:` prefix it is asked as IPv4), else
    `invalid_code` (invalid_hostname_reject_code) 5.5.2 invalid ip address; any other name has no opinion."""
    log.warning("restriction permit_naked_ip_address is deprecated. Use permit_mynetworks or "
                "permit_sasl_authenticated instead")
    if not helo or helo.strip("0123456789.:"):
        return None
    return PERMIT if is_postfix_ipv4(helo) else status.invalid_helo_address(helo, invalid_code)


def client_full_keys(hostname: str) -> tuple[int, int]:
    """The indices of `client_keys` that pattern tables (regexp, pcre, cidr) are asked: the name and the address
    (Postfix's check_client_access asks both as FULL lookups; their parent domains and networks as PARTIAL ones, which
    only fixed-string tables answer). So a pattern on the address matches a client that has a name too."""
    return 0, len(domain_keys(hostname)) if hostname else 0


def address_access_keys(addr: str, delimiter: str) -> list[str]:
    """check_sender/recipient_access (access(5)): user+ext@domain, user@domain, domain and its parents,
    user+ext@, user@. The null sender is `<>`. No `@domain` key: that is the virtual(5) and canonical(5) form,
    which Postfix's access maps never ask (a table shared with those must list the domain itself). Each key that
    holds the local part is asked in Postfix's quoting, then, where that differs, in internal form (`"w.1."@x`,
    then `w.1.@x`: mail_addr_find's legacy query form), the extension split off the internal form."""
    return address_access_search(addr, delimiter)[0]


def address_access_search(addr: str, delimiter: str, null_key: str = NULL_SENDER_KEY
                          ) -> tuple[list[str], tuple[int, ...]]:
    """`address_access_keys` and the indices of those that pattern tables are asked (Postfix's FULL lookups):
    the whole address, in both of its forms when they differ (mailflow.tables.search.address_search); the null
    sender's one key is `null_key` (smtpd.null_access_lookup_key)."""
    if not addr:
        return [null_key], (0,)
    return address_search(addr, delimiter=delimiter, form=EXTERNAL_FIRST, at_domain=False, domains=domain_keys,
                          localpart_at=True)


def is_fqdn_address(addr: str) -> bool:
    local, domain = address.split(addr)
    return bool(domain) and (domain.startswith("[") or "." in domain.rstrip("."))


def is_fqdn_helo(name: str) -> bool:
    """Postfix's reject_non_fqdn_helo_hostname test of a name (an address literal goes to
    `helo_literal_refusal` first): a valid host name with a dot (a bare IP address is no fully-qualified host
    name); one trailing dot does not count."""
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    return "." in name and address.is_valid_domain(name)


def is_valid_helo(name: str) -> bool:
    """Postfix's reject_invalid_helo_hostname test of a name (an address literal goes to `helo_literal_refusal`
    first): valid_hostname (underscores taken) or a bare address as its valid_hostaddr takes it (`01.2.3.4`,
    `2001:db8::1`)."""
    return address.is_valid_domain(name) or address.is_host_address(name)


def warn_items_after_relay_check(items: Sequence[str]) -> None:
    """Postfix 3.7's warning that nothing after check_relay_domains runs (it permits or refuses): `restriction
    `NEXT' after `check_relay_domains' is ignored`, NEXT the next item's first word as written; not where
    warn_if_reject comes just before (its refusal is only logged, so the list goes on). Postfix logs it each time
    the item is evaluated; mailflow once per list, when the lists are loaded."""
    names = [split_item(item)[0] for item in items]
    for index, name in enumerate(names[:-1]):
        if name == "check_relay_domains" and (index == 0 or names[index - 1] != WARN_IF_REJECT):
            log.warning("restriction `%s' after `%s' is ignored", items[index + 1].split()[0], "check_relay_domains")


# ---------------------------------------------------------------------------------------------- evaluation


class Restrictions:
    """The restriction lists of one SmtpdConfig; see the module doc."""

    def __init__(self, config, smtpd, rewriter, mapper, resolver=None, tables: TableCache | None = None, *,
                 greylist=None, sender_auth=None, verifier: Verifier | None = None):
        """`greylist` (mailflow.filters.greylist.Greylist) serves check_greylist, `sender_auth`
        (mailflow.filters.senderauth.SenderAuth) reject_spf_fail, `verifier` reject_unverified_recipient and
        _sender; without them those have no opinion."""
        tables = tables or TableCache()
        self._table_cache = tables  # (its `run` asks a blocking table, sqlite, off the event loop)
        self._warned_going_away: set[str] = set()  # old items whose going-away warning was logged
        self._greylist = greylist
        self._verifier = verifier
        self._sender_auth = sender_auth
        self._config = config
        self._smtpd = smtpd
        self._unknown_codes = unknown_reject_codes(smtpd)  # the unknown-user refusal's code per address class
        self._rewriter = rewriter
        self._mapper = mapper
        self._rbl_replies = RblReplies(smtpd, config.myhostname, tables, fit_dsn=dsn_fix)
        self._dns = DnsChecks(resolver, rewriter, smtpd.unknown_address_reject_code,
                              smtpd.unknown_address_tempfail_action)
        self._lists = {stage: tuple(split_item(i) for i in getattr(smtpd, f"{stage}_restrictions"))
                       for stage in STAGES}
        self._rcpt_steps = RCPT_STEPS if smtpd.delay_reject else RCPT_STEPS[-1:]  # the early ones ran before
        self._etrn_steps = ETRN_STEPS if smtpd.delay_reject else ETRN_STEPS[-1:]
        self._classes = {name: tuple(split_item(i) for i in items) for name, items in smtpd.restriction_classes.items()}
        every = (*self._lists.values(), *self._classes.values())
        for items in (*(getattr(smtpd, f"{stage}_restrictions") for stage in STAGES),
                      *smtpd.restriction_classes.values()):
            warn_items_after_relay_check(items)
        self._tables = {arg: tables.open([arg]) for items in every for name, arg in items
                        if name in ACCESS_CHECKS or name in SERVER_ACCESS_CHECKS or name == REVERSE_CLIENT_ACCESS}
        self._relay_clientcerts = tables.open(smtpd.relay_clientcerts)
        self._policies = {arg: policy_service(arg, smtpd) for items in every for name, arg in items
                          if name == "check_policy_service"}
        # mynetworks is in Postfix's parent_domain_matches_subdomains: a table is asked the name's parents
        self._mynetworks = NetworkList.from_items(config.mynetworks, tables.open, parent_style=True,
                                                 setting="mynetworks")
        self._servers = ServerChecks(resolver, rewriter, NetworkList.from_items(
            smtpd.permit_mx_backup_networks, tables.open, parent_style=True, setting="permit_mx_backup_networks"),
            lookup_time=config.dns.timeout * config.dns.tries)
        self._lines = SmtpdLog()  # WARN's and INFO's log lines
        self._logged_permits = logged_permits(smtpd.log_access_permit_actions)
        # the reject_*sender_login_mismatch items' maps (none: they refuse nothing, as Postfix's)
        self._sender_logins = SenderLogins(tables.open(smtpd.sender_login_maps), resolve=rewriter.resolved_address,
                                           delimiter=config.recipient_delimiter)
        self._value_lists: dict[str, tuple[tuple[str, str], ...]] = {}  # access values read as lists, by value
        self._no_unknown_recipient_checks = "no_unknown_recipient_checks" in smtpd.receive_override_options

    async def check_rcpt(self, facts: Facts) -> status.Reply | None:
        """The lists' verdict (DEFER_IF_PERMIT applied), then the implied unknown-user check, as Postfix runs
        smtpd_check_rcptmap after smtpd_check_rcpt: a deferral from the lists comes before it."""
        verdict = _conditional_deferrals(await self._verdict(self._rcpt_steps, facts), facts)
        if verdict is None and self._smtpd.reject_unlisted_recipient and facts.marks.discard is None:
            return _conditional_deferrals(await self._listed(facts, "recipient"), facts)
        return verdict

    async def check_etrn(self, facts: Facts) -> status.Reply | None:
        """ETRN, as Postfix's smtpd_check_etrn: the client and helo lists (delay_reject false: they ran at connect
        and HELO, their DEFER_IF_PERMIT is in `facts.defer_if_permit`), then the etrn list; a DEFER_IF_PERMIT
        makes a permit its deferral."""
        return _conditional_deferrals(await self._verdict(self._etrn_steps, facts), facts)

    async def _verdict(self, steps: tuple[tuple[str, ...], ...], facts: Facts) -> status.Reply | None:
        """The first refusal of the lists, a DEFER_IF_REJECT met in its own step applied (RCPT_STEPS, ETRN_STEPS).
        Without a sender (VRFY outside a transaction) the relay and recipient lists start from the DEFER_IF_PERMIT
        the session's last sender list left (`facts.defer_if_permit_sender`), not the client and helo lists':
        Postfix's smtpd_check_rcpt takes it from its state's defer_if_permit_sender, which only its sender step
        sets (and no RSET clears)."""
        for step in steps:
            facts.defer_if_reject = None
            if step == RCPT_STEPS[-1] and facts.sender is None:
                facts.defer_if_permit = facts.defer_if_permit_sender
            for stage in step:
                if facts.marks.discard is not None:
                    return None
                reply = await self._run(stage, facts)
                if reply is not None:
                    return _deferred_if_reject(reply, facts)
        return None

    async def _run(self, stage: str, facts: Facts) -> status.Reply | None:
        """A stage's list, then, after the sender list, the implied reject_unlisted_sender
        (smtpd_reject_unlisted_sender), as Postfix's smtpd_check_mail runs it: after a permit too, not after a
        refusal nor for a discarded message or the null sender. The helo list runs only once the client gave a
        HELO/EHLO name, as Postfix's smtpd_check_helo (none given: the whole list is skipped, its `reject` too;
        smtpd_helo_required is what makes a client say one); the sender list only in a transaction, as
        smtpd_check_mail (a VRFY outside one runs the client, helo, relay and recipient lists)."""
        if (stage == "helo" and not facts.helo) or (stage == "sender" and facts.sender is None):
            return None
        answer = await self._run_items(self._lists[stage], stage, facts)
        if stage == "sender":  # (whatever its verdict: Postfix's smtpd_check_mail saves it so)
            facts.defer_if_permit_sender = facts.defer_if_permit
        if isinstance(answer, status.Reply):
            return answer  # the session logs it (NOQUEUE: reject: ...)
        if stage == "sender" and self._smtpd.reject_unlisted_sender and facts.sender and facts.marks.discard is None:
            return await self._listed(facts, "sender")
        return None

    async def check_early(self, stage: str, facts: Facts) -> status.Reply | None:
        """With delay_reject false, the client, helo or sender list on its own (at connect or XCLIENT, HELO/EHLO,
        MAIL), as Postfix's smtpd_check_client, _helo, _mail: its refusal (a DEFER_IF_REJECT of the list
        applied), or None. A DEFER_IF_PERMIT is not applied here: it stays in `facts.defer_if_permit` for the
        caller to carry to the RCPT lists (Postfix's defer_if_permit_client, _helo, _sender)."""
        facts.defer_if_reject = None
        reply = await self._run(stage, facts)
        return _deferred_if_reject(reply, facts) if reply is not None else None

    @property
    def check_data_command(self) -> bool:
        """The data list has items (empty by default: nothing to evaluate at DATA)."""
        return bool(self._lists["data"])

    @property
    def check_content(self) -> bool:
        """The end_of_data list has items (empty by default: nothing to evaluate at the end of the message)."""
        return bool(self._lists["end_of_data"])

    async def check_data(self, facts: Facts) -> status.Reply | None:
        if facts.marks.discard is not None:
            return None
        return _conditional_deferrals(await self._run("data", facts), facts)

    async def check_end_of_data(self, facts: Facts) -> status.Reply | None:
        if facts.marks.discard is not None:
            return None
        return _conditional_deferrals(await self._run("end_of_data", facts), facts)

    async def preload(self) -> None:
        """Every file-backed table of these lists read now, in a worker thread (the server calls it before a
        listener serves): read at its first lookup, a 100 000-line cidr: table held the event loop 0.5 s."""
        await self._table_cache.preload()

    def close(self) -> None:
        """The policy services' kept connections are closed (a reload replaced these lists, or the server stops)."""
        for client in (service.client for service in self._policies.values()):
            client.close()

    def trusted(self, client_addr: str, client_name: str | None = None) -> bool:
        """The client is in mynetworks (a table that cannot answer: not, logged)."""
        return self._mynetworks.contains(client_addr, client_name)

    async def _run_items(self, items: tuple[tuple[str, str], ...], stage: str, facts: Facts,
                         subject: tuple[str, str] | None = None):
        """One list (a stage's, a restriction class's, an access table's value): PERMIT, a Reply, or None when no
        item had an opinion. `subject`: what `reject` and `defer` name (default: the stage's; in an access table's
        value, what the table was asked about, as Postfix's generic_checks is given it)."""
        facts.depth += 1
        try:
            for name, arg in items:
                if name == WARN_IF_REJECT:
                    facts.warn_if_reject = facts.warn_if_reject or facts.depth
                    continue
                answer = await (self._evaluate_item(name, arg, stage, facts, subject) if facts.warn_if_reject
                                else self._evaluate(name, arg, stage, facts, subject))
                if facts.warn_if_reject >= facts.depth:  # the item warn_if_reject named is done
                    facts.warn_if_reject = 0
                if answer == PERMIT or isinstance(answer, status.Reply):
                    return answer
                if facts.marks.discard is not None:
                    return None
                if facts.defer_if_permit is not None and facts.defer_if_reject is not None:
                    return None  # a 450 whatever comes next: Postfix's generic_checks stops here
            return None
        finally:
            if facts.warn_if_reject >= facts.depth:  # (a list that ends with warn_if_reject)
                facts.warn_if_reject = 0
            facts.depth -= 1

    async def _evaluate_item(self, name: str, arg: str, stage: str, facts: Facts, subject: tuple[str, str] | None):
        """`_evaluate` under warn_if_reject (Postfix's smtpd_check_reject; without it `_run_items` calls `_evaluate`
        itself, one coroutine less on the hot path): a refusal, or a DEFER_IF_PERMIT
        the item raised, is logged `reject_warning: …` and becomes no opinion. A reply marked `server_fault` (a
        configuration error, a failed resolve or login lookup: Postfix's reject_server_error, reject_dict_retry) is
        not made a warning, as Postfix's are not; a policy's 4.3.x (an access action, an access table that cannot
        answer, a policy server's default action) is only a policy's verdict and is."""
        answer = await self._evaluate(name, arg, stage, facts, subject)
        for deferral in facts.warned_deferrals or ():
            self._warn(deferral, facts, stage)
        facts.warned_deferrals = None
        if isinstance(answer, status.Reply) and not answer.server_fault:
            self._warn(answer, facts, stage)
            return None
        return answer

    def _warn(self, refusal, facts: Facts, stage: str) -> None:
        """`reject_warning: …`, the refusal as it would have been sent (a 5xx as 4xx under soft_bounce: Postfix's
        smtpd_check_reject)."""
        text = str(refusal)
        self._whatsup("reject_warning", status.soft_bounced(text) if self._config.soft_bounce else text, facts, stage)

    async def _evaluate(self, name: str, arg: str, stage: str, facts: Facts, subject: tuple[str, str] | None = None):
        """PERMIT, a refusal Reply, or None (no opinion)."""
        if name in self._classes and name not in KNOWN:  # a restriction class: its list, as one item
            return await self._run_items(self._classes[name], stage, facts, subject)
        try:
            simple = self._simple(name, stage, facts, subject)
        except LookupRetry as e:  # a domain list's table (virtual_mailbox_domains) cannot answer now
            log.warning("%s: %s", name, e.reason)
            return status.error_reply(e, facts.recipient)
        if simple is not _UNHANDLED:
            return simple
        if name in ACCESS_CHECKS:
            return await self._access(ACCESS_CHECKS[name], arg, stage, facts)
        if name == "reject_rbl_client":
            return await self._rbl_reply(await self._dns.rbl(arg, facts), facts)
        if name == "reject_maps_rbl":
            return await self._maps_rbl(facts)
        if name == "check_policy_service":
            return await self._policy(arg, stage, facts, subject)
        if name == "reject_unknown_recipient_domain":
            return await self._dns.unknown_recipient_domain(facts)
        if name == "reject_unlisted_recipient":
            return await self._listed(facts, "recipient") if facts.recipient else None
        if name == "reject_unlisted_sender":
            return await self._listed(facts, "sender") if facts.sender else None
        if name in SENDER_LOGIN_CHECKS:
            return await self._sender_login(name, facts)
        if name in CLIENT_CERT_PERMITS:
            return await self._certificate_item(name, stage, facts, subject)
        if name in RHSBL_CHECKS:
            return await self._rbl_reply(await self._dns.rhsbl(RHSBL_CHECKS[name], arg, facts), facts)
        if name in ("reject_unknown_client_hostname", "reject_unknown_reverse_client_hostname"):
            return await self._dns.unknown_client(facts, self._smtpd.unknown_client_reject_code,
                                                  reverse_only=name == "reject_unknown_reverse_client_hostname")
        if name == "reject_unknown_sender_domain":
            return await self._dns.unknown_sender_domain(facts)
        if name == "check_greylist":
            return await self._greylisted(facts)
        if name == "reject_spf_fail":
            return await self._spf_fail(facts)
        if name == "reject_dmarc_policy":
            return self._dmarc_policy(facts)
        if name == "reject_unverified_recipient":
            return await self._unverified("recipient", facts.recipient, facts) if facts.recipient else None
        if name == "reject_unverified_sender":
            return await self._unverified("sender", facts.sender, facts) if facts.sender else None
        return await self._dns_item(name, arg, stage, facts)

    async def _dns_item(self, name: str, arg: str, stage: str, facts: Facts):
        """The DNS-based items of the second group (server access, allowlists, MX backup, the HELO name)."""
        if name in SERVER_ACCESS_CHECKS:
            return await self._server_access(name, arg, stage, facts)
        if name == REVERSE_CLIENT_ACCESS:
            return await self._reverse_client_access(arg, stage, facts)
        if name in DNSWL_CHECKS:
            return await self._allowlisted(name, arg, stage, facts)
        if name == "reject_unknown_helo_hostname":
            smtpd = self._smtpd
            return await self._dns.unknown_helo(facts, smtpd.unknown_hostname_reject_code,
                                                smtpd.unknown_helo_hostname_tempfail_action,
                                                smtpd.invalid_hostname_reject_code)
        if name == "permit_mx_backup":
            return await self._mx_backup(stage, facts) if facts.recipient else None
        raise AssertionError(f"restriction {name!r} has no evaluation")  # check_item lets no such name in

    def _simple(self, name: str, stage: str, facts: Facts, subject: tuple[str, str] | None = None):
        """The restrictions that need no I/O; _UNHANDLED for the others."""
        rcpt = facts.recipient
        if name == "permit":
            if not self._logs_permit(name):
                return PERMIT
            who, what = subject or self._subject(stage, facts)
            return self._permitted(name, what, who, facts, stage)
        if name in ("reject", "defer"):
            who, what = subject or self._subject(stage, facts)
            smtpd = self._smtpd
            return status.access_denied(who, what, code=smtpd.reject_code) if name == "reject" \
                else status.rule_deferred(who, what, smtpd.defer_code)
        if name in CONDITIONAL_DEFERRALS:
            who, what = subject or self._subject(stage, facts)
            reply = status.requested_deferral(who, what, name)
            if name == "defer_if_permit":
                facts.raise_defer_if_permit(reply)  # (under warn_if_reject: only logged, as Postfix's)
            else:  # (under warn_if_reject too, as Postfix's DEFER_IF_REJECT2)
                facts.defer_if_reject = facts.defer_if_reject or reply
            return None
        if name == "permit_mynetworks":
            return self._client_permitted(name, facts, stage) \
                if self._mynetworks.holds(facts.client_addr, facts.client_name) else None
        if name == "permit_sasl_authenticated":
            return self._client_permitted(name, facts, stage) if facts.authenticated else None
        if name == "permit_inet_interfaces":
            return self._client_permitted(name, facts, stage) if facts.on_this_host else None
        if name in ("reject_unauth_destination", "defer_unauth_destination"):
            if not rcpt or self._rewriter.authorized_destination(rcpt):
                return None
            code = self._smtpd.relay_domains_reject_code
            if name.startswith("reject"):
                return status.relay_denied(rcpt, code)
            if code - 100 < 400:  # (Postfix's smtpd_check_reject: the only clue the admin gets)
                log.warning("SMTP reply code configuration error: %d 4.7.1 <%s>: Relay access denied", code - 100,
                            rcpt)
            return status.relay_deferred(rcpt, code)
        return self._simple_names(name, facts, subject) if name in _NAME_CHECKS \
            else self._simple_more(name, stage, facts, subject)

    def _warn_going_away(self, item: str, instead: str) -> None:
        """Postfix 3.7's warning that an old item is going away, logged once (per restriction set)."""
        if item not in self._warned_going_away:
            self._warned_going_away.add(item)
            log.warning(f'support for restriction "{item}" will be removed from Postfix; use "{instead}" instead')

    async def _maps_rbl(self, facts: Facts):
        """Postfix 3.7's reject_maps_rbl: reject_rbl_client with each of maps_rbl_domains in turn, the first that
        lists the client refusing; its warning that the item is going away logged once (per restriction set)."""
        self._warn_going_away("reject_maps_rbl", "reject_rbl_client domain-name")
        for rbl_domain in self._smtpd.maps_rbl_domains:
            reply = await self._rbl_reply(await self._dns.rbl(rbl_domain, facts), facts)
            if reply is not None:
                return reply
        return None

    def _relay_domains(self, facts: Facts, stage: str):
        """Postfix 3.7's check_relay_domains: permit a client whose name is in relay_domains (or a subdomain of
        one), or a recipient this host takes mail for (permit_auth_destination); else `<a@b>: Recipient address
        rejected: Relay access denied` (relay_domains_reject_code). Its warning that the item is going away logged
        once (per restriction set).
        May raise LookupRetry."""
        self._warn_going_away("check_relay_domains", "reject_unauth_destination")
        rcpt = facts.recipient
        if self._rewriter.client_in_relay_domains(facts.client_name) or self._rewriter.authorized_destination(rcpt):
            return self._permitted("check_relay_domains", SUBJECT["recipient"], rcpt, facts, stage)
        return status.relay_domains_denied(rcpt, self._smtpd.relay_domains_reject_code)

    def _simple_names(self, name: str, facts: Facts, subject: tuple[str, str] | None):
        """More of `_simple`: the names that must be fully qualified or valid (non_fqdn_reject_code,
        invalid_hostname_reject_code)."""
        rcpt, helo, non_fqdn = facts.recipient, facts.helo, self._smtpd.non_fqdn_reject_code
        if name == "reject_non_fqdn_sender":
            return status.non_fqdn_address(facts.sender, "Sender address", non_fqdn) if facts.sender and not \
                is_fqdn_address(facts.sender) else None
        if name == "reject_non_fqdn_recipient":
            return status.non_fqdn_address(rcpt, "Recipient address", non_fqdn) \
                if rcpt and not is_fqdn_address(rcpt) else None
        invalid = self._smtpd.invalid_hostname_reject_code
        if not helo:
            return None
        if helo.startswith("["):
            return helo_literal_refusal(helo, invalid)
        if name == "reject_non_fqdn_helo_hostname":
            return None if is_fqdn_helo(helo) else status.non_fqdn_helo(helo, non_fqdn)
        return None if is_valid_helo(helo) else status.invalid_helo(helo, invalid)

    def _simple_more(self, name: str, stage: str, facts: Facts, subject: tuple[str, str] | None):
        """More of `_simple`: the session's own facts (pipelining, TLS), the null sender's recipients, the
        destination, the HELO name; _UNHANDLED for the others."""
        if name == "reject_unauth_pipelining":
            return status.unauth_pipelining(*(subject or self._subject(stage, facts))) if facts.ill_pipelining \
                else None
        if name == "reject_multi_recipient_bounce":  # (at RCPT the count holds this recipient)
            return status.multi_recipient_bounce(*(subject or self._subject(stage, facts)),
                                                 self._smtpd.multi_recipient_bounce_reject_code) \
                if facts.sender == "" and facts.recipient_count > 1 else None
        if name == "reject_plaintext_session":
            return None if facts.encrypted else status.encryption_required(self._smtpd.plaintext_reject_code)
        if name == "permit_auth_destination":
            rcpt = facts.recipient
            return self._permitted(name, SUBJECT["recipient"], rcpt, facts, stage) \
                if rcpt and self._rewriter.authorized_destination(rcpt) else None
        if name == "check_relay_domains":
            return self._relay_domains(facts, stage) if facts.recipient else None
        if name == "permit_naked_ip_address":
            answer = naked_ip_address(facts.helo, self._smtpd.invalid_hostname_reject_code)
            return self._permitted(name, SUBJECT["helo"], facts.helo, facts, stage) if answer == PERMIT else answer
        return _UNHANDLED

    async def _certificate_item(self, name: str, stage: str, facts: Facts, subject: tuple[str, str] | None):
        """permit_tls_clientcerts, permit_tls_all_clientcerts in a restriction list: PERMIT or no opinion; when
        relay_clientcerts cannot answer, Postfix's reject_dict_retry naming what the list is about (`<host[ip]>` in
        the client list, the HELO name in the helo list, ...), a server fault."""
        try:
            return self._client_permitted(name, facts, stage) \
                if await self.certificate_permits(name, facts.client_cert, facts.encryption_protocol) else None
        except LookupRetry:
            return status.lookup_failed((subject or self._subject(stage, facts))[0])

    async def certificate_permits(self, name: str, cert: ClientCert | None, encryption_protocol: str) -> bool:
        """Postfix's permit_tls_clientcerts (the certificate's or its public key's fingerprint is a key of
        relay_clientcerts, whatever its value) and permit_tls_all_clientcerts (any trusted certificate; else as
        the other), in a restriction list or local_header_rewrite_clients. Without TLS (no `encryption_protocol`)
        no opinion; in TLS without a certificate, Postfix's warning when none was asked for. LookupRetry when
        relay_clientcerts cannot answer (logged in Postfix 3.7's words; asked off the event loop when it may wait:
        TableCache.run)."""
        if not encryption_protocol:
            return False
        if cert is None:
            if not self._smtpd.tls_ask_ccert:
                log.warning('%s is requested, but "tls_ask_ccert = false"', name)
            return False
        if cert.trusted and name == "permit_tls_all_clientcerts":
            return True
        for key in filter(None, (cert.fingerprint, cert.pkey_fingerprint)):
            try:
                if await self._table_cache.run(find, self._relay_clientcerts, [key]) is not None:
                    return True
            except LookupRetry:
                log.warning("relay_clientcerts: lookup error for fingerprint '%s', pkey fingerprint %s",
                            cert.fingerprint, cert.pkey_fingerprint)
                raise
        return False

    def _subject(self, stage: str, facts: Facts) -> tuple[str, str]:
        """(name, class) a refusal in `stage` names: <addr>: Recipient address, <host[ip]>: Client host, …"""
        what = SUBJECT[stage]
        if stage == "client":
            return facts.client, what
        if stage == "helo":
            return facts.helo, what
        if stage in ("sender", "mail"):
            return facts.sender or "", what
        if stage in ("data", "end_of_data"):
            return PROTOCOL_STATE[stage], what
        if stage == "etrn":
            return facts.etrn_domain, what
        return facts.recipient, what

    # -------------------------------------------------------------------------------- recipient checks

    async def _listed(self, facts: Facts, whose: str) -> status.Reply | None:
        """reject_unlisted_sender / reject_unlisted_recipient (`whose`: "sender", "recipient"), the items and the
        implied checks, as Postfix's check_sender_rcpt_maps / check_recipient_rcpt_maps: nothing on a listener
        with receive_override_options = no_unknown_recipient_checks (an after-queue filter's return: the mail was
        checked before), nor when the command already checked that address outside warn_if_reject."""
        checked = facts.listed_checked
        if self._no_unknown_recipient_checks or (checked is not None and whose in checked):
            return None
        if not facts.warn_if_reject:
            facts.listed_checked = {whose} if checked is None else checked | {whose}
        if whose == "sender":
            return await self._unlisted(facts.sender or "", facts.recipient or None, SUBJECT["sender"])
        return await self._unlisted(facts.recipient, facts.sender)

    async def _unlisted(self, rcpt: str, sender: str | None, what: str = SUBJECT["recipient"]) -> status.Reply | None:
        """The unknown-user rule, trivial-rewrite's (Rewriter.recipient_refusal: listed by a rewriting table or
        its class's recipient table, error-transport addresses refused (with the sender's routing), postmaster
        always accepted), asked without holding up the event loop. `what` "Sender address": reject_unlisted_sender,
        the same rule for the sender (routed by the recipient, as Postfix's; its status fitted to a sender)."""
        try:
            refusal = await self._rewriter.tables.run(self._rewriter.recipient_refusal, rcpt, self._mapper, sender,
                                                      what, self._unknown_codes)
        except LookupRetry as e:  # the lookup outran its deadline
            log.warning("%s <%s>: %s", what, rcpt, e.reason)
            return status.error_reply(e, rcpt)
        if refusal is None or what == SUBJECT["recipient"]:
            return refusal
        return replace(refusal, status=dsn_fix(refusal.status, what))

    async def _sender_login(self, name: str, facts: Facts) -> status.Reply | None:
        """reject_*sender_login_mismatch (SENDER_LOGIN_CHECKS): the one check of auth.SenderLogins, with
        sender_login_maps asked the sender as Postfix resolves it first (`user` is `user@myorigin`, the percent
        hack applied); the null sender passes. Without AUTH on the listener Postfix ignores the item, logged
        whatever the sender (the null one too). The maps are asked off the event loop when they may wait."""
        if not self._smtpd.sasl_auth_enable:
            log.warning("restriction `%s' ignored: no SASL support", name)
            return None
        if not facts.sender:
            return None
        authenticated, unauthenticated, allow_unknown = SENDER_LOGIN_CHECKS[name]
        try:
            return await self._table_cache.run(partial(
                self._sender_logins.refusal, facts.sender, facts.sasl_username or None, authenticated=authenticated,
                unauthenticated=unauthenticated, allow_unknown=allow_unknown))
        except LookupRetry as e:
            log.warning("sender_login_maps: %s", e.reason)
            return status.error_reply(e, facts.sender)

    # -------------------------------------------------------------------------------- access tables

    async def _rbl_reply(self, listed: Listed | None, facts: Facts) -> status.Reply | None:
        """reject_rbl_client, reject_rhsbl_*: the refusal of a list that named the client (rbl_replies.py)."""
        return None if listed is None else await self._rbl_replies.reply(listed, facts)

    async def _access(self, kind: str, spec: str, stage: str, facts: Facts):
        if kind == "ccert":
            return await self._certificate_access(spec, stage, facts)
        keys, full, name, what = self._access_keys(kind, facts)
        if keys is None:
            return None
        try:
            found = await self._find(spec, keys, full)
        except LookupRetry as e:
            log.warning("%s lookup error for %r: %s", spec, keys[0] if keys else "", e.reason)
            return status.restriction_table_failure(name, what)
        if found is None:
            return None
        return await self.action(found[2], name, what, facts, source=spec, stage=stage)

    async def _certificate_access(self, spec: str, stage: str, facts: Facts):
        """check_ccert_access: the certificate's fingerprint, then its public key's, each asked on its own (a DUNNO
        for one goes on to the other), as Postfix's check_ccert_access; a refusal names the certificate's
        CommonName (`<CN>: Client certificate rejected: …`). Without a certificate no opinion (Postfix's warning
        when none was asked for)."""
        cert = facts.client_cert
        if cert is None:
            if facts.encryption_protocol and not self._smtpd.tls_ask_ccert:
                log.warning('check_ccert_access is requested, but "tls_ask_ccert = false"')
            return None
        name, what = cert.subject_cn, "Client certificate"
        for key in filter(None, (cert.fingerprint, cert.pkey_fingerprint)):
            try:
                found = await self._find(spec, [key])
            except LookupRetry as e:
                log.warning("%s lookup error for %r: %s", spec, key, e.reason)
                return status.restriction_table_failure(name, what)
            answer = None if found is None else await self.action(found[2], name, what, facts, source=spec,
                                                                   stage=stage)
            if answer is not None or facts.marks.discard is not None:
                return answer
        return None

    def _access_keys(self, kind: str, facts: Facts) -> tuple[list[str] | None, tuple[int, ...], str, str]:
        """(keys, the indices of the FULL ones, name, what) of an access item; keys None: nothing to ask."""
        if kind == "client":
            return (client_keys(facts.client_addr, facts.client_name), client_full_keys(facts.client_name),
                    facts.client, "Client host")
        if kind == "helo":
            return (domain_keys(facts.helo) if facts.helo else None), (0,), facts.helo, "Helo command"
        if kind == "etrn":
            return ((domain_keys(facts.etrn_domain) if facts.etrn_domain else None), (0,), facts.etrn_domain,
                    SUBJECT["etrn"])
        if kind == "sasl":  # (Postfix: only with AUTH on the listener; else the item is ignored, logged)
            if not self._smtpd.sasl_auth_enable:
                log.warning("restriction `check_sasl_access' ignored: no SASL support")
            if not (facts.sasl_username and self._smtpd.sasl_auth_enable):
                return None, (0,), "", ""
            return [facts.sasl_username], (0,), printable(facts.sasl_username, "_"), SUBJECT["sasl"]
        if kind == "sender":
            if facts.sender is None:
                return None, (0,), "", ""
            return *self._address_keys(facts.sender), facts.sender, "Sender address"
        if not facts.recipient:
            return None, (0,), "", ""
        return *self._address_keys(facts.recipient), facts.recipient, "Recipient address"

    def _address_keys(self, addr: str) -> tuple[list[str], tuple[int, ...]]:
        """The access keys (and FULL indices) of the address as Postfix's check_mail_access resolves it first:
        qualified (`user` is `user@myorigin`), the percent hack applied while the domain is local; the null
        sender stays `<>`."""
        resolved = self._rewriter.resolved_address(addr) if addr else addr
        return address_access_search(resolved, self._config.recipient_delimiter, self._smtpd.null_access_lookup_key)

    async def action(self, value: str, name: str, what: str, facts: Facts, *, source: str, stage: str):
        """An access(5) action (a table's value or a policy server's answer): PERMIT, a Reply or None. A value
        that is no action is a list of restrictions and restriction classes, evaluated (`_value_list`)."""
        word, _, text = value.strip().partition(" ")
        text = text.strip()
        upper = word.upper()
        if upper in ("OK", "RELAY"):  # (Postfix: RELAY is OK, for old tables)
            return self._permitted(word, what, name, facts, stage, source)
        if upper == "DUNNO":
            return None
        if upper == "REJECT":
            return status.access_denied(name, what, *split_dsn(text, "5.7.1", what),
                                        code=self._smtpd.access_map_reject_code)
        if upper == "DEFER":
            return status.access_deferred(name, what, *split_dsn(text, "4.7.1", what),
                                          code=self._smtpd.access_map_defer_code)
        if upper in _MARKS and self._no_transaction(upper, source, facts):
            return None
        if upper == "DISCARD":
            self._whatsup("discard", _triggered(upper, name, what, text), facts, stage)
            facts.marks.discard = text or f"{source}: DISCARD"
            return self._permitted(word, what, name, facts, stage, source)
        if upper == "HOLD":
            if facts.marks.hold is None:  # Postfix: a held message's next HOLD is not logged
                self._whatsup("hold", _triggered(upper, name, what, text), facts, stage)
                facts.marks.hold = text or f"{source}: HOLD"
                facts.marks.hold_logged = True
            return None
        if upper == "DEFER_IF_PERMIT":
            facts.raise_defer_if_permit(status.conditional_deferral(
                name, what, *split_dsn(text, "4.7.1", what), code=self._smtpd.access_map_defer_code))
            return None
        if upper == "DEFER_IF_REJECT":
            facts.defer_if_reject = facts.defer_if_reject or status.conditional_deferral(
                name, what, *split_dsn(text, "4.7.1", what), code=self._smtpd.access_map_defer_code)
            return None
        if upper in ("WARN", "INFO"):
            self._whatsup(upper.lower(), text, facts, stage)  # Postfix's log_whatsup: the text alone
            return None
        if upper == "PREPEND" and stage == "end_of_data":  # the header section has been received
            log.warning("%s: access action PREPEND must be used before end_of_data_restrictions; ignored", source)
            return None
        if upper in _MARK_NEEDS:
            if _mark(upper, text, facts.marks, source) and upper != "PREPEND":
                self._whatsup(upper.lower(), _triggered(upper, name, what, text), facts, stage)
            return None
        if value.strip().isascii() and value.strip().isdigit():  # Postfix: a time stamp some POP-before-SMTP
            return self._permitted(word, what, name, facts, stage, source)  # schemes write: OK
        if not upper:  # Postfix: "entry ... has empty value", an OK from the days when an empty value meant OK
            log.warning("%s: access action has empty value; taken as OK", source)
            return PERMIT
        numeric = _NUMERIC_ACTION.fullmatch(value.strip())
        if numeric:
            code, rest = numeric.groups()
            dsn, reason = split_leading_dsn(rest or "")
            # fitted (and logged) in its own class, as Postfix's smtpd_dsn_fix does; then the code's class wins
            dsn = code[0] + dsn_fix(dsn or f"{code[0]}.7.1", what)[1:]
            return status.restriction_rejected(int(code), dsn, name, what, (reason or "Access denied").strip())
        items = self._value_list(value, source, facts)
        if items is None:
            return status.restriction_config_error(name, what)
        return await self._run_items(items, stage, facts, (name, what))

    @staticmethod
    def _no_transaction(word: str, source: str, facts: Facts) -> bool:
        """Postfix's not_in_client_helo: before MAIL (the client and helo lists with delay_reject false) there is
        no message for an action that marks one; it is skipped (DUNNO) and logged in Postfix's words, which name
        delay_reject false whatever the setting (a VRFY outside a transaction meets it with delay_reject true).
        At ETRN too (Postfix's can_delegate_action: ETRN receives no mail)."""
        if facts.command == "ETRN":
            log.warning("access table %s: action %s is unavailable in etrn_restrictions", source, word)
            return True
        if facts.sender is not None:
            return False
        log.warning("access table %s: with delay_reject = false, action %s is always skipped in Client host or "
                    "Helo command restrictions", source, word)
        return True

    def _whatsup(self, action: str, text: str, facts: Facts, stage: str) -> None:
        """Postfix's log_whatsup: `QID: action: RCPT from host[ip]: text; from=<s> to=<r> proto=… helo=<…>`, at the
        command that met the action, NOQUEUE before the transaction has its queue id."""
        self._lines.reject(protocol_state(stage, facts), facts.client, text,
                           sender=facts.sender, recipient=facts.recipient, protocol=facts.protocol,
                           helo=facts.helo, action=action, queue_id=facts.queue_id)

    def _value_list(self, value: str, source: str, facts: Facts) -> tuple[tuple[str, str], ...] | None:
        """An access value that is no action, as Postfix's check_table_result takes it: restriction names and
        restriction classes, separated by spaces or commas (`permit_mynetworks, reject`, `my_class`). None (logged;
        the caller answers 451 4.3.5) for a name neither restriction nor class, for a lookup table (Postfix:
        "define a restriction class and specify its name instead") and for a loop through the tables (deeper
        than Postfix's 100 levels)."""
        if ":" in value:
            log.warning("%s: access table entry %r names a lookup table; name a restriction class instead", source,
                        value)
            return None
        if facts.depth > MAX_DEPTH:
            log.warning("%s: access table entry %r causes unreasonable recursion", source, value)
            return None
        known = self._value_lists.get(value)
        if known is None:
            try:
                known = self._read_value_list(value)
            except ValueError as e:
                log.warning("%s: unknown access action %r: %s", source, value, e)
                return None
            if len(self._value_lists) >= VALUE_LIST_CACHE:
                self._value_lists.clear()
            self._value_lists[value] = known
        return known

    def _read_value_list(self, value: str) -> tuple[tuple[str, str], ...]:
        """The items of an access value read as a list; ValueError for a word neither restriction nor class, and
        for a restriction whose filter no list set up (greylisting, SPF, DMARC named only in a table)."""
        words = value.replace(",", " ").split()
        items = []
        i = 0
        while i < len(words):
            word = words[i]
            takes_argument = word.lower() in WITH_ARGUMENT and i + 1 < len(words)
            item = split_item(check_item(f"{word} {words[i + 1]}" if takes_argument else word, self._classes))
            if item[0] in NEEDS_FILTER and not self._has_filter(item[0]):
                raise ValueError(f"{item[0]} is not set up: name it in a restriction list or class")
            items.append(item)
            i += 2 if takes_argument else 1
        return tuple(items)

    def _has_filter(self, name: str) -> bool:
        return (self._greylist if name == "check_greylist" else self._sender_auth) is not None

    # -------------------------------------------------------------------------------- DNS: servers, allowlists

    async def _server_access(self, name: str, spec: str, stage: str, facts: Facts):
        """check_*_{mx,ns,a}_access (Postfix's check_server_access): the table asked with each MX, NS or A host of
        the name (ServerChecks.servers: the host's name and parent domains, then each address and its networks);
        the first entry found is the action. An OK is refused (451 4.3.5, logged): Postfix's forbid_allowlist, as
        whoever runs the DNS of the name could make it so."""
        target = await self._server_target(SERVER_ACCESS_CHECKS[name][0], facts)
        if target is None:
            return None
        looked_up, reply_name, what = target
        found = await self._first_server_entry(name, spec, looked_up, reply_name, what, facts.memo)
        if found is None or isinstance(found, status.Reply):
            return found
        answer = await self.action(found, reply_name, what, facts, source=spec, stage=stage)
        return _forbid_allowlist(name, answer, looked_up, facts)

    async def _reverse_client_access(self, spec: str, stage: str, facts: Facts):
        """check_reverse_client_hostname_access: check_client_access's keys, of the client's PTR name unverified
        (`unknown` without one, as Postfix asks it); refusals name `<ptr name>: Unverified Client host`; an OK is
        refused as the server access checks' are (Postfix's forbid_allowlist: whoever runs the reverse zone
        chooses that name)."""
        reverse = await self._dns.reverse_name(facts) or "unknown"
        keys = client_keys(facts.client_addr, reverse)
        what = "Unverified Client host"
        try:
            found = await self._find(spec, keys, client_full_keys(reverse))
        except LookupRetry as e:
            log.warning("%s lookup error for %r: %s", spec, reverse, e.reason)
            return status.restriction_table_failure(reverse, what)
        if found is None:
            return None
        answer = await self.action(found[2], reverse, what, facts, source=spec, stage=stage)
        return _forbid_allowlist(REVERSE_CLIENT_ACCESS, answer, reverse, facts)

    async def _first_server_entry(self, name: str, spec: str, looked_up: str, reply_name: str, what: str,
                                  memo: dict):
        """The table's value for the first server name or address it has; None; a Reply when it cannot answer."""
        rr = SERVER_ACCESS_CHECKS[name][1]
        asked: dict[str, bool] = {}  # (a hundred hosts of one long domain share most parent domains: each asked once)
        async with aclosing(self._servers.servers(rr, looked_up, reply_name, what, memo)) as servers:
            async for kind, value in servers:
                keys, full = _not_asked(domain_keys(value) if kind == "name" else client_keys(value, ""), asked)
                try:
                    found = await self._find(spec, keys, full) if keys else None
                except LookupRetry as e:
                    log.warning("%s lookup error for %r: %s", spec, value, e.reason)
                    return status.restriction_table_failure(reply_name, what)
                if found is not None:
                    return found[2]
        return None

    async def _find(self, spec: str, keys: list[str], full: Collection[int] = (0,)) -> tuple[str, str, str] | None:
        """find() in the access table `spec`, off the event loop when a table may wait (sqlite: TableCache.run).
        May raise LookupRetry."""
        return await self._table_cache.run(find, self._tables[spec], keys, full)

    async def _server_target(self, subject: str, facts: Facts) -> tuple[str, str, str] | None:
        """(the name whose servers are asked about, the name a refusal gives, what it is) of a server access
        check; None when there is none (no client name, no HELO, the null sender, ...), as Postfix skips it."""
        if subject == "client":
            known = facts.client_name and facts.client_name.lower() != "unknown"
            return (facts.client_name, facts.client, SUBJECT["client"]) if known \
                else None
        if subject == "reverse_client":
            reverse = await self._dns.reverse_name(facts)
            known = reverse and reverse.lower() != "unknown"  # (a given name may be it: Postfix skips it)
            return (reverse, reverse, "Unverified Client host") if known else None
        value = {"helo": facts.helo, "sender": facts.sender, "recipient": facts.recipient}[subject]
        return (value, value, SUBJECT[subject]) if value else None

    async def _allowlisted(self, name: str, arg: str, stage: str, facts: Facts):
        """permit_dnswl_client / permit_rhswl_client: PERMIT for a listed client. At RCPT, never for a recipient
        this host would not take without it (Postfix: no allowlisting of relaying); a lookup that fails is a
        DEFER_IF_REJECT (DnsChecks.allowlisted)."""
        try:
            if protocol_state(stage, facts) == "RCPT" and facts.recipient and \
                    not self._rewriter.authorized_destination(facts.recipient):
                return None
        except LookupRetry as e:  # a domain list's table cannot answer now
            log.warning("%s: %s", name, e.reason)
            return status.error_reply(e, facts.recipient)
        if not await self._dns.allowlisted(DNSWL_CHECKS[name], arg, facts):
            return None
        return self._client_permitted(name, facts, stage)

    async def _mx_backup(self, stage: str, facts: Facts):
        """permit_mx_backup (ServerChecks.mx_backup): PERMIT for a recipient this host is a backup MX of."""
        try:
            backup = await self._servers.mx_backup(facts.recipient, facts)
        except LookupRetry as e:  # the recipient's class: a domain list's table cannot answer now
            log.warning("permit_mx_backup: %s", e.reason)
            return status.error_reply(e, facts.recipient)
        return self._permitted("permit_mx_backup", SUBJECT["recipient"], facts.recipient, facts, stage) if backup \
            else None

    def _logs_permit(self, name: str) -> bool:
        """log_access_permit_actions names the action (any case), or is `static:all`."""
        logged = self._logged_permits
        return logged is None or name.lower() in logged

    def _permitted(self, name: str, what: str, subject: str, facts: Facts, stage: str, source: str = "") -> str:
        """PERMIT, logged when log_access_permit_actions names the action (any case) and no DEFER_IF_PERMIT
        overrules it (Postfix's smtpd_acl_permit: `permit: RCPT from host[ip]: action=NAME for Client host=host[ip]
        ; ...`, the space before the `;` its empty format's, seen on 3.7.11; an access table's `action=OK for Sender
        address=s@d from TABLE`: `source`)."""
        if self._logs_permit(name) and facts.defer_if_permit is None:
            self._whatsup("permit", f"action={name} for {what}={subject} {f'from {source}' if source else ''}",
                          facts, stage)
        return PERMIT

    def _client_permitted(self, name: str, facts: Facts, stage: str) -> str:
        """`_permitted` for a permit about the client (permit_mynetworks, permit_sasl_authenticated, ...): Postfix
        names the client whatever the list (nothing built when the permit is not logged, the common case)."""
        if not self._logs_permit(name):
            return PERMIT
        return self._permitted(name, SUBJECT["client"], facts.client, facts, stage)

    # -------------------------------------------------------------------------------- filters and policy

    async def _greylisted(self, facts: Facts):
        """No opinion of its own: a triplet to greylist is postgrey's answer, DEFER_IF_PERMIT (a later refusal of
        the recipient still wins)."""
        if self._greylist is not None and facts.recipient and facts.sender is not None and \
                not await self._greylist.check(facts.client_addr, facts.sender, facts.recipient):
            facts.raise_defer_if_permit(status.greylisted(facts.recipient))

    async def _spf_fail(self, facts: Facts):
        """reject_spf_fail: the sender's SPF record says this client may not send for it (550 5.7.23)."""
        if self._sender_auth is None or facts.sender is None:
            return None
        key = ("spf", facts.client_addr, facts.helo, facts.sender)
        if key not in facts.memo:
            facts.memo[key] = await self._sender_auth.spf(facts.client_addr, facts.helo, facts.sender)
        result, _ = facts.memo[key]
        return status.spf_failed(facts.sender or facts.helo, facts.client_addr) if result == "fail" else None

    def _dmarc_policy(self, facts: Facts):
        """reject_dmarc_policy (end of data): DMARC failed and the From domain says p=reject (550 5.7.1) or
        p=quarantine (the message is held); a temperror under either (an aligned SPF or DKIM check could not be
        completed) is deferred (450 4.7.1)."""
        verdicts = facts.auth
        if verdicts is None:
            return None
        if verdicts.dmarc == "temperror" and verdicts.dmarc_policy in ("reject", "quarantine"):
            return status.dmarc_deferred(verdicts.dmarc_domain)
        if verdicts.dmarc != "fail":
            return None
        if verdicts.dmarc_policy == "reject":
            return status.dmarc_rejected(verdicts.dmarc_domain)
        if verdicts.dmarc_policy == "quarantine":
            facts.marks.hold = f"DMARC policy of {verdicts.dmarc_domain}: quarantine"
        return None

    async def _unverified(self, kind: str, addr: str, facts: Facts):
        """Postfix's reject_unverified_address: the verifier's status of the address, a new probe waited for up to
        address_verify_poll_delay x (poll_count - 1) (Postfix polls that long). Deliverable: no opinion. A bounce
        gets unverified_<kind>_reject_code, a deferral or a probe still under way the defer code; a 5xx is a
        refusal (`undeliverable address`), a 4xx (`unverified address`) a DEFER_IF_PERMIT unless the
        tempfail_action is defer. The enhanced code is 4.1.1 (recipient) or 4.1.7 (sender), in the reply's class."""
        if self._verifier is None:
            return None
        verdict = self._verifier.query(addr)
        if verdict.status is VerifyStatus.TODO:
            settings = self._verifier.settings
            await self._verifier.wait(addr, settings.poll_delay * (settings.poll_count - 1))
            verdict = self._verifier.query(addr, probe=False)
        if verdict.status is VerifyStatus.OK:
            return None
        smtpd = self._smtpd
        code = getattr(smtpd, f"unverified_{kind}_reject_code" if verdict.status is VerifyStatus.BOUNCE
                       else f"unverified_{kind}_defer_code")
        text = getattr(smtpd, f"unverified_{kind}_reject_reason") or verdict.text
        dsn = f"{str(code)[0]}.1.{'1' if kind == 'recipient' else '7'}"
        what = SUBJECT[kind]
        if code >= 500:
            return status.undeliverable_address(addr, what, code, dsn, text)
        reply = status.unverified_address(addr, what, code, dsn, text)
        if getattr(smtpd, f"unverified_{kind}_tempfail_action") == "defer":
            return reply
        facts.raise_defer_if_permit(reply)
        return None

    async def _policy(self, spec: str, stage: str, facts: Facts, subject: tuple[str, str] | None = None):
        name, what = subject or self._subject(stage, facts)
        service = self._policies[spec]
        endpoint = service.client.spec
        try:
            answer = await service.client.query(policy_request(facts, stage, service.context))
        except PolicyError as e:
            log.warning("policy service %s: %s", endpoint, e)
            # policy_service_default_action, an access(5) action (Postfix: 451 4.3.5 Server configuration problem)
            return await self.action(service.default_action, name, what, facts, source=spec, stage=stage)
        # (the item as written names the answer's source, braces too: Postfix's check_table_result gets `server`)
        return await self.action(answer, name, what, facts, source=spec, stage=stage)


_UNHANDLED = object()
_NAME_CHECKS = {"reject_non_fqdn_sender", "reject_non_fqdn_recipient", "reject_non_fqdn_helo_hostname",
                "reject_invalid_helo_hostname"}  # (Restrictions._simple_names)
_MARKS = {"DISCARD", "HOLD", "FILTER", "PREPEND", "REDIRECT", "BCC"}  # the actions that mark the message
_MARK_NEEDS = {"FILTER": "transport:destination", "PREPEND": "header: text", "REDIRECT": "user@domain target",
               "BCC": "user@domain target"}


def _mark(word: str, text: str, marks: Marks, source: str) -> bool:
    """FILTER, PREPEND, REDIRECT, BCC mark the message and go on (True). An argument that is not what the action
    takes is logged and the action ignored (False: DUNNO), as Postfix's check_table_result does; Postfix takes
    any REDIRECT or BCC argument with an `@`, mailflow only a valid address."""
    if word == "FILTER" and ":" in text:
        marks.filter = text
    elif word == "PREPEND" and _HEADER_FIELD.fullmatch(text):
        marks.prepend.append(text)
    elif word == "REDIRECT" and address.mailbox_syntax_error(text) is None:
        marks.redirect = text
    elif word == "BCC" and address.mailbox_syntax_error(text) is None:
        if text not in marks.bcc:  # (a sender's entry answers at every RCPT: one copy)
            marks.bcc.append(text)
    else:
        log.warning("%s: access action %s %r requires %s; ignored", source, word, text, _MARK_NEEDS[word])
        return False
    return True


def logged_permits(actions: tuple[str, ...]) -> frozenset[str] | None:
    """The permits log_access_permit_actions asks to log, in lower case (None: all of them, `static:all`); a permit
    name mailflow does not know is warned of."""
    if ALL_PERMITS in actions:
        return None
    others = [name for name in actions if not is_logged_permit(name)]
    if others:
        log.warning("log_access_permit_actions: the permits of %s are not logged (mailflow logs those of %s, and "
                    "access actions: %s)", ", ".join(others), ", ".join(LOGGED_PERMITS), PERMIT_VALUES_TEXT)
    return frozenset(name.lower() for name in actions)


def _not_asked(keys: list[str], asked: dict[str, bool]) -> tuple[list[str], tuple[int, ...]]:
    """The keys of one server entry not asked before in the check, and which of them pattern tables are asked (the
    first, the entry itself, unless it was asked in full before: then none). `asked`: key -> asked in full (of
    pattern tables too), updated."""
    first = keys[:1] if keys and not asked.get(keys[0]) else []
    fresh = first + [k for k in keys[1:] if k not in asked and k not in first]
    for key in fresh:
        asked.setdefault(key, False)
    if first:
        asked[first[0]] = True
    return fresh, (0,) if first else ()


def _forbid_allowlist(name: str, answer, target: str, facts: Facts):
    """Postfix's forbid_allowlist: an item that may refuse but not permit (its table is asked with names someone
    else's DNS chooses) and permitted gives 451 4.3.5 Server configuration error, logged in Postfix's three lines;
    a DISCARD (a permit that drops the message) stands."""
    if answer != PERMIT or facts.marks.discard is not None:
        return answer
    log.warning("restriction %s returns OK for %s", name, target)
    log.warning("this is not allowed for security reasons")
    log.warning("use DUNNO instead of OK if you want to make an exception")
    return status.SERVER_CONFIGURATION_ERROR


def _triggered(word: str, name: str, what: str, text: str) -> str:
    """What Postfix's check_table_result logs for HOLD, DISCARD, REDIRECT, BCC and FILTER: `<name>: what text`,
    `triggers HOLD action` (DISCARD) without a text, `triggers REDIRECT addr` (BCC, FILTER)."""
    if word in ("HOLD", "DISCARD"):
        return f"<{name}>: {what} {text or f'triggers {word} action'}"
    return f"<{name}>: {what} triggers {word} {text}"


def protocol_state(stage: str, facts: Facts) -> str:
    """The command a list runs for, in Postfix's words: CONNECT, HELO, MAIL, …, RCPT, DATA, END-OF-MESSAGE."""
    return facts.command or PROTOCOL_STATE.get(stage, "RCPT")


def given_reverse_name(facts: Facts) -> str:
    """The reverse client name of a policy request: the one XCLIENT gave (`unknown` for none), else the name smtpd
    knows (mailflow looks the PTR name up only for the checks that read it)."""
    given = facts.given_reverse_name
    if given is None:
        return facts.client_name
    return "unknown" if given in (UNAVAILABLE, TEMPUNAVAIL) else given


def policy_request(facts: Facts, stage: str, context: str = "") -> dict[str, str]:
    """The SMTPD_POLICY_README attributes mailflow knows; the others are sent empty. queue_id is the transaction's,
    as Postfix sends it: empty until its first recipient was accepted (the RCPT after that one on)."""
    return {
        "request": "smtpd_access_policy",
        "protocol_state": protocol_state(stage, facts),
        "protocol_name": facts.protocol,
        "helo_name": facts.helo,
        "queue_id": facts.queue_id,
        "sender": facts.sender or "",
        "recipient": facts.recipient,
        "recipient_count": str(facts.recipient_count if stage in PROTOCOL_STATE else 0),  # Postfix: 0 before DATA
        "client_address": facts.client_addr,
        "client_name": facts.client_name,
        "client_port": facts.client_port,  # (`unknown` after XCLIENT PORT=[UNAVAILABLE], `0` after PORT=0)
        "reverse_client_name": given_reverse_name(facts),
        "server_address": facts.server_addr or "unknown",  # (XCLIENT DESTADDR=[UNAVAILABLE], Postfix's unknown)
        "server_port": "unknown" if facts.server_port is None else str(facts.server_port),  # (DESTPORT=0: 0)
        "instance": facts.instance,
        "sasl_method": facts.sasl_method,
        "sasl_username": facts.sasl_username,
        "sasl_sender": "",
        "size": str(facts.size),
        **_certificate_attributes(facts.client_cert),
        "encryption_protocol": facts.encryption_protocol,
        "encryption_cipher": facts.encryption_cipher,
        "encryption_keysize": "0",
        "etrn_domain": facts.etrn_domain,
        "stress": "",
        "policy_context": context,
    }


def _certificate_attributes(cert: ClientCert | None) -> dict[str, str]:
    """The policy request's ccert_* attributes, as Postfix's check_policy_service sends them: the names (xtext)
    only when the certificate is trusted, the fingerprints whenever one was sent."""
    trusted = cert is not None and cert.trusted
    return {
        "ccert_subject": xtext_encode(cert.subject_cn) if trusted and cert else "",
        "ccert_issuer": xtext_encode(cert.issuer_cn) if trusted and cert else "",
        "ccert_fingerprint": cert.fingerprint if cert else "",
        "ccert_pubkey_fingerprint": cert.pkey_fingerprint if cert else "",
    }


def split_dsn(text: str, default: str, what: str) -> tuple[str, str]:
    """(text, enhanced code) of an action's text: an enhanced code at its start is the reply's, fitted to what is
    refused (`dsn_fix`, which logs it in its own class, as Postfix's smtpd_dsn_fix does), then in the class of
    `default` (Postfix's dsn_split and its class fix: `REJECT 4.1.2 text` is 5.1.2), else `default`."""
    dsn, rest = status.split_leading_dsn(text)
    return (text, default) if dsn is None else (rest, default[0] + dsn_fix(dsn, what)[1:])


# Postfix's smtpd_dsn_fix map: an address status's last digit -> what it becomes for a sender, for a recipient
_SENDER_DSN = {"1": "1.7", "2": "1.8", "3": "1.7", "4": "1.7", "5": "1.0", "6": "1.7", "7": "1.7", "8": "1.8"}
_RECIPIENT_DSN = {"1": "1.1", "2": "1.2", "3": "1.3", "4": "1.4", "5": "1.5", "6": "1.6", "7": "1.3", "8": "1.2"}


def dsn_fix(dsn: str, what: str) -> str:
    """Postfix's smtpd_dsn_fix: one access entry may refuse senders, recipients, clients and HELO names alike,
    so an address status (X.1.Y) is made to fit what is refused: a recipient's for a sender (`5.1.2` bad
    destination system is `5.1.8` bad sender's system), a sender's for a recipient, and `X.0.0` for what is not
    an address (client, HELO, DATA). Other statuses are kept."""
    klass, _, rest = dsn.partition(".")
    subject, _, detail = rest.partition(".")
    if subject != "1":
        return dsn
    if what == SUBJECT["sender"]:
        fixed = f"{klass}.{_SENDER_DSN.get(detail, '1.0')}"
    elif what == SUBJECT["recipient"]:
        fixed = f"{klass}.{_RECIPIENT_DSN.get(detail, '1.0')}"
    else:
        fixed = f"{klass}.0.0"
    if fixed != dsn:
        log.info("mapping DSN status %s into %s status %s", dsn, what, fixed)
    return fixed


def _conditional_deferrals(verdict: status.Reply | None, facts: Facts) -> status.Reply | None:
    """Postfix's DEFER_IF_PERMIT (a permit, explicit or at the end of the lists, becomes that deferral) and
    DEFER_IF_REJECT (`_deferred_if_reject`)."""
    if verdict is None:
        return facts.defer_if_permit
    return _deferred_if_reject(verdict, facts)


def _deferred_if_reject(verdict: status.Reply, facts: Facts) -> status.Reply:
    """DEFER_IF_REJECT: a later 5xx refusal becomes DEFER_IF_REJECT's own deferral, its text and code."""
    if facts.defer_if_reject is not None and verdict.code >= 500:
        return facts.defer_if_reject
    return verdict
