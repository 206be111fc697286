"""The smtpd restrictions that ask the DNS: reject_rbl_client, reject_rhsbl_client/reverse_client/sender/helo/
recipient, permit_dnswl_client, permit_rhswl_client, reject_unknown_client_hostname,
reject_unknown_reverse_client_hostname, reject_unknown_helo_hostname, reject_unknown_sender_domain and
reject_unknown_recipient_domain (Postfix's postconf(5) meanings; the ones that ask about a domain's servers are
server_checks.py's). restrictions.py decides when each runs; this module asks the resolver and words the answer.

    DnsChecks(resolver, rewriter, unknown_address_reject_code, unknown_address_tempfail_action)
        .rbl(arg, facts), .rhsbl(kind, arg, facts)      listed (any address; with a filter, one it takes): a Listed,
                                                         with the list's TXT reason (rbl_replies.py words the reply)
        .allowlisted(kind, arg, facts) -> bool           permit_dnswl_client (kind "client": the address) and
                                                         permit_rhswl_client ("client_name": the verified name)
                                                         listed as reject_rbl_client's lists are; a lookup that
                                                         fails is a DEFER_IF_REJECT 450 4.7.1 (Postfix)
        .unknown_client(facts, code, reverse_only=...)   without a (verified) name: `code` 4.7.25 (the reverse
                                                         name's: 4.7.1); DNS cannot tell (XCLIENT NAME's
                                                         [TEMPUNAVAIL] too): 450, at once
        .unknown_helo(facts, code, tempfail_action)      no A, AAAA or MX (a null MX is one) for the HELO name:
                                                         `code` 4.7.1 "Host not found"; none found and a lookup
                                                         failed (a null MX too then): 450 as a DEFER_IF_PERMIT (or
                                                         at once: tempfail_action "defer"); an address literal
                                                         that is no address: 501 5.5.2
        .reverse_name(facts) -> str                      the client's first PTR name ("" for none)
        .unknown_sender_domain(facts)                    no MX and no address (asked also when the MX lookup
                                                         fails or says NXDOMAIN): unknown_address_reject_code
                                                         4.1.8; a null MX: 550 5.7.27; a lookup of any of MX, A,
                                                         AAAA failed and none found: 450 4.1.8 as a
                                                         DEFER_IF_PERMIT (or at once: unknown_address_tempfail_action
                                                         "defer")
        .unknown_recipient_domain(facts)                 the same for a recipient (4.1.2); a null MX: 556 5.1.10
    rbl_query_name(client_addr, rbl_domain) -> str | None

Only domains this host is not final destination for are asked about (address classes relay and default).
A client's PTR names, its verified name, each list query's answer (or failure), whether a HELO name has host
records and a sender's or recipient's domain's MX and address records (or that it does not exist; a temporary
failure is asked again at the next check, as Postfix's) are remembered in the session's `facts.memo` (delay_reject
reruns the lists at every RCPT; the handler bounds the memo).

Failure behaviour: a DNSBL that cannot be asked counts as not listed (logged as Postfix's `RBL lookup error`), a
DNS allowlist too, with a DEFER_IF_REJECT; when the DNS cannot tell now the unknown client name checks defer (450)
at once, the HELO name and address domain checks with a DEFER_IF_PERMIT 450 (their tempfail_action "defer": at
once), as Postfix's do. Nothing here raises.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mailflow import address, status
from mailflow.address import client_ip
from mailflow.dns import (DNS_INVAL, DNS_NULLMX, DNS_FAIL, DNS_RETRY, MX, NotFound, confirmed_name, failure_rank,
                          failure_text, is_ip_literal, ptr_name_gripe, ptr_names, record_strings, worst_failure)
from mailflow.dnsbl_sites import filter_matches, reply_filter
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass
from mailflow.rbl_reply import txt_reason
from mailflow.stages.smtpd.rbl_replies import Listed
from mailflow.syntax import is_ipv4

if TYPE_CHECKING:
    from mailflow.stages.smtpd.restrictions import Facts

log = logging.getLogger("mailflow.smtpd")

REMOTE = (AddressClass.DEFAULT, AddressClass.RELAY)
# What the DNS says of a HELO name or an address's domain (Postfix's dns_lookup_l statuses, as its checks take them).
FOUND, UNKNOWN, NULL_MX, MALFORMED, RETRY = "found", "unknown", "null MX", "malformed", "retry"
# A host name's verdict from the worst status its lookups met (DNS_FAIL ranks over DNS_NULLMX: then not found).
HOST_VERDICTS = {DNS_RETRY: RETRY, DNS_INVAL: MALFORMED, DNS_FAIL: UNKNOWN, DNS_NULLMX: FOUND}
TEMPUNAVAIL = "[TEMPUNAVAIL]"  # XCLIENT NAME's "the front end's DNS cannot tell now" (SMTPD_PEER_CODE_TEMP)
# A given name that is none (SMTPD_PEER_CODE_PERM): XCLIENT NAME's [UNAVAILABLE], or peername_lookup = no. Not
# "unknown": XCLIENT NAME=unknown is a name (its status OK), as Postfix's xclient_cmd takes it.
UNAVAILABLE = "[UNAVAILABLE]"


def rbl_query_name(client_addr: str, rbl_domain: str) -> str | None:
    """`4.3.2.1.zen.example` for 1.2.3.4 (nibbles for IPv6); None for a client without an IP address."""
    ip = client_ip(client_addr)
    if ip is None:
        return None
    labels = str(ip).split(".") if ip.version == 4 else list(ip.exploded.replace(":", ""))
    reverse = ".".join(reversed(labels))
    return f"{reverse}.{rbl_domain}"


class DnsChecks:
    """See the module docstring. Without a resolver every check has no opinion (None)."""

    def __init__(self, resolver, rewriter, unknown_address_reject_code: int,
                 unknown_address_tempfail_action: str):
        self._resolver = resolver
        self._rewriter = rewriter
        self._unknown_code = unknown_address_reject_code
        self._tempfail_action = unknown_address_tempfail_action

    # -------------------------------------------------------------------------------- block lists

    async def rbl(self, arg: str, facts: Facts) -> Listed | None:
        """reject_rbl_client: the client's address (reversed) under the list has an address (any; with a filter,
        one it takes) -> what the list said (its TXT reason too); None when not listed or it cannot be asked."""
        rbl_domain, _, wanted = arg.partition("=")
        query = rbl_query_name(facts.client_addr, rbl_domain)
        if query is None or not await self._listed(query, wanted, facts.memo):
            return None
        return Listed(arg, facts.client_addr, "Client host", await self._reason(query, facts.memo))

    async def rhsbl(self, kind: str, arg: str, facts: Facts) -> Listed | None:
        """reject_rhsbl_<kind>: `<domain>.<rbl>` has an address (any; with a filter, one it takes) -> what the list
        said; what was looked up is named as Postfix names it: the whole sender or recipient address, else the name."""
        rbl_domain, _, wanted = arg.partition("=")
        subject, what = await self._rhsbl_subject(kind, facts)
        subject = subject or ""
        is_address = kind in ("sender", "recipient") and subject
        domain = address.normalise_domain(address.split(subject)[1] if is_address else subject)
        query = f"{domain}.{rbl_domain}"
        if not domain or domain.startswith("[") or not await self._listed(query, wanted, facts.memo):
            return None
        return Listed(arg, subject, what, await self._reason(query, facts.memo))

    async def _rhsbl_subject(self, kind: str, facts: Facts) -> tuple[str | None, str]:
        if kind == "client":
            return _named(await self._verified_client_name(facts)), "Client host"
        if kind == "reverse_client":
            return _named(await self.reverse_name(facts)), "Unverified Client host"
        if kind == "helo":
            return facts.helo, "Helo command"
        addr = facts.sender if kind == "sender" else facts.recipient
        return addr, ("Sender address" if kind == "sender" else "Recipient address")

    async def _listed(self, query: str, wanted: str, memo: dict) -> bool | None:
        """`query` has an IPv4 address (any without a filter, as Postfix's smtpd and postscreen take it; with one,
        any the filter `wanted` takes: `127.0.0.2`, `127.0.0.[2..11]`, as Postfix's ip_match and rbl_match_addr);
        None when the DNS cannot tell (logged once: the answer, a failure too, is kept in the session's `memo`, as
        Postfix's smtpd keeps it in its RBL cache)."""
        if self._resolver is None:
            return False
        key = ("dnsxl", query)
        if key not in memo:
            memo[key] = await self._list_answers(query)
        answers = memo[key]
        if answers is None:
            return None
        octets = reply_filter(wanted) if wanted else None
        return any(is_ipv4(a) and (octets is None or filter_matches(octets, a))
                   for a in answers)  # (a filter alone decides, as Postfix's rbl_match_addr, postscreen's too)

    async def _list_answers(self, query: str) -> tuple[str, ...] | None:
        """The A records of a list's `query` (Postfix asks no AAAA of a list); None when the lookup failed."""
        try:
            return tuple(await self._resolver.ipv4_addresses(query))
        except NotFound:
            return ()
        except LookupRetry as e:
            log.warning("%s: RBL lookup error: %s", query, failure_text(e))  # (dns_lookup's why, as Postfix's)
            return None

    async def _reason(self, query: str, memo: dict) -> str:
        """The list's TXT records for `query` as Postfix's reason (rbl_reply.txt_reason), each record's first string
        (Postfix 3.7's dns_lookup keeps no other); "" when it has none or they cannot be had (nothing logged, as
        Postfix). Asked once a session, and only of a list that names the client (Postfix asks it with every
        address answer)."""
        key = ("dnsxl txt", query)
        if key not in memo:
            try:
                records = await record_strings(self._resolver, query)
                memo[key] = txt_reason([strings[0] if strings else "" for strings in records])
            except (NotFound, LookupRetry):
                memo[key] = ""
        return memo[key]

    async def allowlisted(self, kind: str, arg: str, facts: Facts) -> bool:
        """permit_dnswl_client / permit_rhswl_client: the client's address (reversed, as for a DNSBL) or its
        verified name (not one ending in a numeric label, as Postfix's find_dnsxl_domain) is listed under the
        allowlist. A lookup that fails permits nothing and makes a later 5xx refusal a 450 (DEFER_IF_REJECT)."""
        list_domain, _, wanted = arg.partition("=")
        if kind == "client":
            subject = facts.client_addr
            query = rbl_query_name(subject, list_domain)
        else:
            subject = address.normalise_domain(_named(await self._verified_client_name(facts)))
            query = f"{subject}.{list_domain}" if _rhs_name(subject) else None
        if query is None:
            return False
        listed = await self._listed(query, wanted, facts.memo)
        if listed is None:
            facts.defer_if_reject = facts.defer_if_reject or status.conditional_deferral(subject, "Client host")
        return bool(listed)

    # -------------------------------------------------------------------------------- client names

    async def unknown_client(self, facts: Facts, code: int, *, reverse_only: bool) -> status.Reply | None:
        """reject_unknown_(reverse_)client_hostname, as Postfix's reject_unknown_client / _reverse_name: no name
        for the address (or, unless reverse_only, no name that leads back to it): `code` (unknown_client_reject_code);
        450 when the DNS cannot tell now. At once: Postfix has no tempfail action for these."""
        given = facts.given_reverse_name if reverse_only else facts.given_name
        if given is None and (self._resolver is None or client_ip(_names_addr(facts)) is None):
            return None
        if reverse_only:  # (Postfix's reverse name is the first PTR name, when a host name: sockaddr_to_hostname)
            names = await self._client_names(facts)
            known = None if names is None else bool(names) and _peer_name(names[0].rstrip("."))
        else:
            name = await self._verified_client_name(facts)
            known = None if name is None else bool(name)
        if known:
            return None
        return status.unknown_client(facts.client_addr, 450 if known is None else code, reverse_only)

    async def reverse_name(self, facts: Facts) -> str:
        """The client's first PTR name, unverified (Postfix's reverse client name); "" for none, for a name that is
        numeric or malformed (Postfix's sockaddr_to_hostname and smtpd_peer refuse those: `unknown`) or when the DNS
        cannot tell now."""
        if facts.given_reverse_name is None and (self._resolver is None or client_ip(_names_addr(facts)) is None):
            return ""
        name = (await self._client_names(facts) or [""])[0].rstrip(".")
        return name if _peer_name(name) else ""

    async def _client_names(self, facts: Facts) -> list[str] | None:
        """The client's reverse names: the given one (XCLIENT NAME's or REVERSE_NAME's, as Postfix's reverse_name;
        none under peername_lookup = no), else its address's PTR names; None when DNS cannot answer now."""
        if facts.given_reverse_name is not None:
            return _given_names(facts.given_reverse_name)
        return await self._ptr_names(facts)

    async def _ptr_names(self, facts: Facts) -> list[str] | None:
        """The PTR names of the address the client's names are found for (_names_addr), memoized per session;
        None when DNS cannot answer now."""
        addr = _names_addr(facts)
        key = ("ptr", addr)
        if key not in facts.memo:
            try:
                names = await ptr_names(self._resolver, addr) \
                    if self._resolver is not None and client_ip(addr) is not None else []
            except LookupRetry as e:
                log.warning("%s: reverse lookup error: %s", addr, e.reason)
                return None
            facts.memo[key] = names
        return facts.memo[key]

    async def _verified_client_name(self, facts: Facts) -> str | None:
        """The client's name whose addresses include the address it was found for (Postfix's verified client name):
        "" when there is none, None when DNS cannot tell now. The given name (XCLIENT NAME's, UNAVAILABLE under
        peername_lookup = no) is, as Postfix's state->name; a REVERSE_NAME is not asked about."""
        if facts.given_name is not None:
            names = _given_names(facts.given_name)
            return None if names is None else (names or [""])[0]
        addr = _names_addr(facts)
        key = ("verified", addr)
        if key in facts.memo:
            return facts.memo[key]
        names = await self._ptr_names(facts)
        if names is None:
            return None
        try:
            found = await confirmed_name(self._resolver, addr, names)
        except LookupRetry as e:
            log.warning("%s: lookup error: %s", addr, e.reason)
            return None
        facts.memo[key] = found
        return found

    # -------------------------------------------------------------------------------- the HELO name

    async def unknown_helo(self, facts: Facts, code: int, tempfail_action: str,
                           invalid_code: int = 501) -> status.Reply | None:
        """reject_unknown_helo_hostname, as Postfix's reject_unknown_hostname: the HELO name has an A, AAAA or MX
        record (a null MX counts), else `code` 4.7.1 "Host not found" ("Malformed DNS server reply" after a reply
        naming no host); when the DNS cannot tell, 450 4.7.1 as a DEFER_IF_PERMIT (tempfail_action "defer": at
        once). An address literal is only checked for being one (Postfix's reject_invalid_hostaddr: `invalid_code`
        5.5.2, invalid_hostname_reject_code)."""
        helo = facts.helo
        if not helo or self._resolver is None:
            return None
        if helo.startswith("["):
            return helo_literal_refusal(helo, invalid_code)
        verdict = await self._host_records_known(helo, facts.memo)
        if verdict == FOUND:
            return None
        if verdict != RETRY:
            return status.unknown_helo_hostname(helo, code, *_malformed(verdict))
        reply = status.unknown_helo_hostname(helo, 450)
        if tempfail_action == "defer":
            return reply
        facts.raise_defer_if_permit(reply)
        return None

    async def _host_records_known(self, name: str, memo: dict) -> str:
        """_host_records, asked once a session (delay_reject runs the HELO restrictions at every RCPT)."""
        key = ("host records", name)
        if key not in memo:
            memo[key] = await self._host_records(name)
        return memo[key]

    async def _host_records(self, name: str) -> str:
        """FOUND: an A, AAAA or MX record for `name` (asked in that order, the first found ends it, as Postfix's
        dns_lookup_l with STOP_OK); else what dns_lookup_rl keeps, the highest status met: RETRY (a lookup failed
        now), MALFORMED (a reply named no host: DNS_INVAL), UNKNOWN after FORMERR (DNS_FAIL), FOUND for a null MX
        (Postfix's "MTA names may have nullMX records"), UNKNOWN. A bare IP address names no host in the DNS (where
        Postfix asks it as a name, which no TLD answers)."""
        if is_ip_literal(name):
            return UNKNOWN
        worst = 0
        for lookup in (self._resolver.addresses, self._resolver.mx):
            try:
                records = await lookup(name)
            except LookupRetry as e:  # (an InvalidReply logged by the resolver, as Postfix's dns_lookup warns)
                if failure_rank(e) == DNS_RETRY:
                    log.debug("%s: address or MX lookup error: %s", name, e.reason)  # (Postfix logs none)
                worst = max(worst, failure_rank(e))
                continue
            except NotFound as e:
                worst = max(worst, failure_rank(e))
                continue
            if any(isinstance(r, MX) and r.is_null for r in records):
                worst = max(worst, DNS_NULLMX)
            elif records:
                return FOUND
        return HOST_VERDICTS.get(worst, UNKNOWN)

    # -------------------------------------------------------------------------------- address domains

    def _remote_domain(self, addr: str | None) -> str | None:
        """The domain of an address this host is not final destination for (None: not asked about)."""
        if not addr or self._resolver is None or self._rewriter.classify(addr) not in REMOTE:
            return None
        domain = address.normalise_domain(address.split(self._rewriter.qualify(addr))[1])
        return None if not domain or domain.startswith("[") else domain

    async def _domain_records(self, lookup: str, domain: str, memo: dict) -> tuple:
        """The records `self._resolver.<lookup>(domain)` gives (`mx` or `addresses`), an answer or NXDOMAIN asked
        once a session (delay_reject runs the sender list at every RCPT); raises NotFound (no such domain), or the
        LookupRetry of a lookup that failed now: that is never kept, the next check asks again, as Postfix's
        reject_unknown_mailhost does at each RCPT (a SERVFAIL once must not defer the session's later mail)."""
        key = ("domain " + lookup, domain)
        if key not in memo:
            try:
                memo[key] = tuple(await getattr(self._resolver, lookup)(domain))
            except NotFound:
                memo[key] = None
        answer = memo[key]
        if answer is None:
            raise NotFound(domain, lookup)
        return answer

    async def _mail_domain(self, domain: str, memo: dict) -> str:
        """What the DNS says of a sender's or recipient's domain, as Postfix's reject_unknown_mailhost asks it
        (dns_lookup_l: MX, then A and AAAA): NULL_MX (RFC 7505), FOUND (an MX, else an address), MALFORMED (a reply
        named no host, Postfix's DNS_INVAL: it ends the lookups) or UNKNOWN (neither); raises LookupRetry when
        nothing was found and a lookup failed now. Only records, a null MX or a malformed reply end it: after an MX
        lookup that failed, or said NXDOMAIN, the addresses are asked, and a failure met on any step wins over
        "not found" or a malformed reply (dns_lookup_rl keeps the highest status met: DNS_RETRY over DNS_INVAL over
        DNS_NOTFOUND)."""
        mx_failure: NotFound | LookupRetry | None = None
        try:
            records = await self._domain_records("mx", domain, memo)
        except (NotFound, LookupRetry) as e:  # (only DNS_INVAL ends it)
            if failure_rank(e) == DNS_INVAL:
                return MALFORMED
            records, mx_failure = (), e
        if any(r.is_null for r in records):
            return NULL_MX
        if records:
            return FOUND
        address_failure: NotFound | LookupRetry | None = None
        try:
            if await self._domain_records("addresses", domain, memo):
                return FOUND
        except (NotFound, LookupRetry) as e:
            address_failure = e
        worst = worst_failure([mx_failure, address_failure])
        if worst is not None and failure_rank(worst) == DNS_RETRY:
            raise worst
        return MALFORMED if failure_rank(worst) == DNS_INVAL else UNKNOWN

    async def unknown_recipient_domain(self, facts: Facts) -> status.Reply | None:
        """No MX and no address for the recipient's domain (`code` 4.1.2 "Domain not found"); a null MX refuses it
        (556 5.1.10, RFC 7505); when the DNS cannot tell, 450 4.1.2 as unknown_address_tempfail_action says."""
        rcpt = facts.recipient
        domain = self._remote_domain(rcpt)
        if domain is None:
            return None
        assert rcpt is not None  # (a domain was found in it)
        try:
            found = await self._mail_domain(domain, facts.memo)
        except LookupRetry as e:
            log.debug("<%s>: MX or address lookup error: %s", rcpt, e.reason)  # (Postfix logs none: the 450 is logged)
            return self._tempfail(status.domain_not_found(rcpt, 450), facts)
        if found == NULL_MX:
            return status.null_mx(rcpt, domain)
        return None if found == FOUND else status.domain_not_found(rcpt, self._unknown_code, *_malformed(found))

    async def unknown_sender_domain(self, facts: Facts) -> status.Reply | None:
        """No MX and no address for the sender's domain (`code` 4.1.8); a null MX refuses it (550 5.7.27), as
        Postfix's; when the DNS cannot tell, 450 4.1.8 as unknown_address_tempfail_action says."""
        sender = facts.sender
        domain = self._remote_domain(sender)
        if domain is None:
            return None
        assert sender is not None  # (a domain was found in it)
        try:
            found = await self._mail_domain(domain, facts.memo)
        except LookupRetry as e:
            log.debug("<%s>: MX or address lookup error: %s", sender, e.reason)  # (as for a recipient)
            return self._tempfail(status.sender_domain_not_found(sender, 450), facts)
        if found == NULL_MX:
            return status.sender_null_mx(sender, domain)
        return None if found == FOUND else status.sender_domain_not_found(sender, self._unknown_code,
                                                                           *_malformed(found))

    def _tempfail(self, reply: status.Reply, facts: Facts) -> status.Reply | None:
        """Postfix's DEFER_IF_PERMIT2(unk_addr_tf_act, ...): the 450 at once under "defer", else a DEFER_IF_PERMIT
        (a later refusal of the lists wins; a permit becomes this 450)."""
        if self._tempfail_action == "defer":
            return reply
        facts.raise_defer_if_permit(reply)
        return None


def _malformed(verdict: str) -> tuple[str, ...]:
    """The reason a refusal gives for `verdict` when it is not the default "not found": Postfix's for DNS_INVAL."""
    return (status.MALFORMED_DNS_REPLY,) if verdict == MALFORMED else ()


def _peer_name(name: str) -> bool:
    """A PTR name Postfix takes as a client's name: a valid host name (valid_hostname), not an address."""
    return ptr_name_gripe(name) is None


def _names_addr(facts: Facts) -> str:
    """The address the client's names are found for: its own, or after XCLIENT ADDR without a NAME the one it
    connected from (Postfix keeps the names smtpd_peer found at connect)."""
    return facts.names_addr or facts.client_addr


def _given_names(given_name: str) -> list[str] | None:
    """The client's names when they were given without the DNS (XCLIENT NAME's, or UNAVAILABLE under
    peername_lookup = no): that name; none for UNAVAILABLE; None (the DNS cannot tell now) for [TEMPUNAVAIL]. A
    literal `unknown` is a name, as Postfix's name_code takes it (reject_unknown_client_hostname passes it; the
    checks that ask the DNS about a name skip it: _named)."""
    if given_name == TEMPUNAVAIL:
        return None
    return [] if given_name == UNAVAILABLE else [given_name]


def _named(name: str | None) -> str:
    """`name` for the checks that ask the DNS about the client's name (RHS lists, the server access checks); ""
    for none and for `unknown`, which Postfix's smtpd_check.c skips there (strcasecmp(name, "unknown"))."""
    return "" if not name or name.lower() == "unknown" else name


def _rhs_name(name: str) -> bool:
    """A name an RHS list is asked about (Postfix's find_dnsxl_domain): a valid host name whose last label is not
    all digits (some lists refuse what looks like an address)."""
    return bool(name) and not name.rpartition(".")[2].isdigit() and address.is_valid_domain(name)


def helo_literal_refusal(helo: str, invalid_code: int) -> status.Reply | None:
    """Postfix's smtpd_check.c sends a HELO that starts with `[` to reject_invalid_hostaddr from
    reject_invalid_helo_hostname, reject_non_fqdn_helo_hostname and reject_unknown_helo_hostname alike: None for
    a valid address literal, else `invalid_code` (invalid_hostname_reject_code) 5.5.2 invalid ip address."""
    return None if address.is_valid_helo_literal(helo) else status.invalid_helo_address(helo, invalid_code)
