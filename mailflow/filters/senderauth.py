"""Sender authentication verdicts: SPF (pyspf), DKIM verification (mailflow.signing.dkim.verify), DMARC (RFC 7489),
and the Authentication-Results header (authres) that cleanup writes.

    SenderAuth(config.sender_auth, resolver, authserv_id=…, also=(), rng=None, header_limit=102400)
    await auth.spf(client_ip, helo, sender) -> (result, domain)          one SPF evaluation
    await auth.verdicts(client_ip, helo, sender, content, spf=None) -> Verdicts
    Verdicts.header() -> "Authentication-Results: …"    Verdicts.dmarc_policy: what a failing From domain asks
                                                          (p= or sp=, one step milder outside its pct= sample)
    auth.close()

Every lookup goes through mailflow's `Resolver` (mailflow.dns: txt, mx, addresses, ptr): tests serve the
zones from the in-process DNS. SPF is mailflow.filters.spf_query (pyspf, its DNS handed back to the event
loop's resolver), run in this object's own small thread pool (so a slow SPF domain cannot take the threads
that spool files use). DKIM is mailflow.signing.dkim.verify (the one verifier, shared with the ARC seal): dkimpy
checks the signature over the header section, the body hash is computed while the body streams (a big message is
never loaded whole). DMARC policy discovery and alignment are
written here (they are a few lines), with the organizational domain from the Public Suffix List that
authheaders ships. A record's pct= is kept as RFC 7489 6.6.4 says: a message outside the sample (drawn with `rng`)
gets the next policy down (reject -> quarantine -> none); a record without a valid p= is p=none when it asks for
reports (rua=), else no policy (RFC 7489 6.6.3), and the organizational domain's record is not asked then.
A From field with several addresses, or several From fields, is checked for each domain (at most
AUTHOR_DOMAIN_LIMIT, at once), the strictest verdict standing (RFC 7489 6.6.1): a failure under p=reject as soon
as it is in, the others cancelled; at the deadline the domains not answered are temperror. A From that cannot be
wholly checked (an address without a domain, an address literal, a group, more than AUTHOR_DOMAIN_LIMIT domains,
From fields longer than FROM_PARSE_LIMIT characters in all) fails under the strictest policy of the domains that
were checked (none has one: permerror).

Failure behaviour: nothing raises for a message or a DNS answer. A lookup that fails is `temperror`; a broken
record or signature `permerror`/`fail` (RFC 7208/6376 words); all of one message's lookups are bounded by
`timeout` (then temperror): SPF, the DKIM keys and the authors' DMARC records are looked up at once (a stranger
whose SPF or DKIM domain never answers cannot spend the time the author's record needed). A domain whose policy is
in, without an aligned SPF or DKIM pass but with an aligned SPF or DKIM temperror, is DMARC temperror carrying the
policy (the check might have passed: reject_dmarc_policy defers it); an aligned pass passes whatever else failed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import importlib.resources
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import authres
import authres.dmarc
from publicsuffix2 import PublicSuffixList

from mailflow.address import normalise_domain, split as split_address
from mailflow.content import Content
from mailflow.dns import NotFound
from mailflow.errors import LookupRetry
from mailflow.filters.spf_query import check_host
from mailflow.signing.dkim import DkimResult, checkers, verify as verify_dkim
from mailflow.message import header_values, read_header
from mailflow.syntax import ascii_digits

SPF_THREADS = 4  # SPF evaluations at once; more wait their turn
HEADER_LIMIT = 102400  # header_size_limit: the header section's bytes read (cleanup refuses a larger one, 552 5.3.4)


@dataclass(frozen=True)
class Verdicts:
    """One message's verdicts, as the Authentication-Results header reports them."""

    authserv_id: str
    spf: str = ""  # "" not evaluated; else pass, fail, softfail, neutral, none, temperror, permerror
    spf_mailfrom: str = ""
    spf_helo: str = ""
    dkim: tuple[DkimResult, ...] | None = None  # None not evaluated; () no signature
    dmarc: str = ""  # "" not evaluated; else pass, fail, none, temperror, permerror
    dmarc_domain: str = ""
    dmarc_policy: str = ""  # the policy of a failing domain (after pct=): none, quarantine, reject

    def header(self) -> str:
        results: list = []
        if self.spf:
            results.append(authres.SPFAuthenticationResult(result=self.spf, smtp_mailfrom=self.spf_mailfrom or None,
                                                           smtp_helo=self.spf_helo or None))
        if self.dkim is not None:
            for sig in self.dkim or (DkimResult("none"),):
                results.append(authres.DKIMAuthenticationResult(
                    result=sig.result, header_d=sig.domain or None, header_s=sig.selector or None,
                    reason=sig.reason or None))
        if self.dmarc:
            results.append(authres.dmarc.DMARCAuthenticationResult(
                result=self.dmarc, header_from=self.dmarc_domain or None, policy=self.dmarc_policy or None))
        return str(authres.AuthenticationResultsHeader(authserv_id=self.authserv_id, results=results))


class SenderAuth:
    """See the module doc."""

    def __init__(self, config, resolver, *, authserv_id: str, also: tuple[str, ...] = (),
                 rng: random.Random | None = None, header_limit: int = HEADER_LIMIT):
        """`also`: verdicts needed besides config.verify (reject_dmarc_policy needs "dmarc"); `rng` draws
        the messages a DMARC pct= samples; `header_limit`: the header section's bytes read (header_size_limit:
        cleanup refuses a message whose header section is larger, 552 5.3.4, so no more is worth reading)."""
        self._header_limit = header_limit
        self._rng = rng if rng is not None else random.Random()
        self._verify = set(config.verify) | set(also)
        if "dmarc" in self._verify:
            self._verify |= {"spf", "dkim"}
        self._resolver = resolver
        self._timeout = config.timeout
        self.authserv_id = config.authserv_id or authserv_id
        self._pool = concurrent.futures.ThreadPoolExecutor(SPF_THREADS, thread_name_prefix="spf")
        self._dkim_checkers = checkers()
        self._psl: PublicSuffixList | None = None
        if "dmarc" in self._verify:
            with importlib.resources.as_file(importlib.resources.files("authheaders") / "public_suffix_list.txt") \
                    as path, open(path, encoding="utf-8") as f:
                self._psl = PublicSuffixList(f)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._dkim_checkers.close()

    # -------------------------------------------------------------------------------- SPF

    async def spf(self, client_ip: str, helo: str, sender: str) -> tuple[str, str]:
        """(result, the domain checked): MAIL FROM's domain, or the HELO name for the null sender."""
        domain = split_address(sender)[1] if sender else helo
        checked = await check_host(self._resolver, client_ip, sender, helo, timeout=self._timeout,
                                   executor=self._pool)
        return checked.result, domain

    # -------------------------------------------------------------------------------- all of them

    async def verdicts(self, client_ip: str, helo: str, sender: str, content: Content,
                       spf_result: tuple[str, str] | None = None) -> Verdicts:
        """SPF, DKIM and the authors' DMARC records at once, all within `timeout`; then DMARC's alignment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        head, _ = read_header(content, self._header_limit)
        found: dict = {"authserv_id": self.authserv_id}
        lookups = self._policy_lookups(head) if "dmarc" in self._verify else None
        try:
            for part in await asyncio.gather(self._spf_verdict(client_ip, helo, sender, spf_result),
                                             self._dkim_verdict(head, content)):
                found.update(part)
            if lookups is not None:
                found.update(await self._dmarc(lookups, sender or f"postmaster@{helo}", found.get("spf", ""),
                                               found.get("dkim") or (), deadline))
        finally:
            if lookups is not None:
                lookups.end()
        return Verdicts(**found)

    async def _spf_verdict(self, client_ip: str, helo: str, sender: str, known: tuple[str, str] | None) -> dict:
        if "spf" not in self._verify:
            return {}
        result, _ = known or await self.spf(client_ip, helo, sender)
        return {"spf": result, "spf_mailfrom": sender if sender else "", "spf_helo": "" if sender else helo}

    async def _dkim_verdict(self, head: bytes, content: Content) -> dict:
        if "dkim" not in self._verify:
            return {}
        return {"dkim": await verify_dkim(head, content.after(len(head)), self._resolver, self._timeout,
                                          self._dkim_checkers)}

    # -------------------------------------------------------------------------------- DMARC

    def _policy_lookups(self, head: bytes) -> PolicyLookups:
        """The From fields' author domains, each one's DMARC record looked up from now on (finding it needs no SPF
        or DKIM result: a name server that stalls SPF or a DKIM key cannot spend the time the record needed)."""
        froms = header_values(head, "from")
        authors = _author_domains(froms)
        loop = asyncio.get_running_loop()
        tasks = {loop.create_task(self._discovered(domain)): domain for domain in authors.domains}
        return PolicyLookups(bool(froms), authors, tasks)

    async def _dmarc(self, lookups: PolicyLookups, mail_from: str, spf_result: str, dkim_results,
                     deadline: float) -> dict:
        """RFC 7489 6.6.1: each author domain is checked (a From field may name several, a message may carry
        several From fields) and the strictest verdict stands: a failure with the strictest policy first. A From
        that cannot be wholly checked (an address without a domain, more than AUTHOR_DOMAIN_LIMIT domains) is a
        failure under the strictest policy of the domains that were (no policy: temperror when a lookup failed,
        else permerror)."""
        authors = lookups.authors
        if not authors.domains:
            return {"dmarc": "permerror" if lookups.any_from else "none"}
        found = await self._each_author(lookups, deadline, mail_from, spf_result, dkim_results)
        if authors.complete:
            return max(found, key=_strictness)
        asking = [verdict for verdict in found if verdict.get("dmarc_policy")]
        if not asking:
            return {"dmarc": "temperror" if any(v["dmarc"] == "temperror" for v in found) else "permerror"}
        strictest = max(asking, key=lambda verdict: POLICIES.index(verdict["dmarc_policy"]))
        return {**strictest, "dmarc": "fail"}

    async def _each_author(self, lookups: PolicyLookups, deadline: float, *check) -> list[dict]:
        """The verdicts of the author domains, as their records come in until `deadline` (then the rest are
        temperror) or until one decides the message: a failure, or a From not wholly checked, under p=reject."""
        loop = asyncio.get_running_loop()
        found: list[dict] = []
        pending = set(lookups.tasks)
        while pending and not any(_decides(verdict, lookups.authors.complete) for verdict in found):
            done, pending = await asyncio.wait(pending, timeout=max(deadline - loop.time(), 0),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            found += [self._evaluated(lookups.tasks[task], task.result(), *check) for task in done]
        return found + [{"dmarc": "temperror", "dmarc_domain": lookups.tasks[task]} for task in pending]

    async def _discovered(self, domain: str) -> Policy | str:
        """The domain's DMARC policy (RFC 7489 6.6.3; pct= drawn), or the verdict when there is none: "none", or
        "temperror" when a lookup failed."""
        org = self._org_domain(domain)
        try:
            record = await self._dmarc_record(domain)
            subdomain = False
            if record is None and org != domain:
                record, subdomain = await self._dmarc_record(org), True
        except LookupRetry:
            return "temperror"
        policy = _policy(record, subdomain) if record is not None else None
        if record is None or policy is None:
            return "none"
        return Policy(self._sampled(policy, record.get("pct", "100")), record)

    def _evaluated(self, domain: str, discovered: Policy | str, mail_from: str, spf_result: str,
                   dkim_results) -> dict:
        """A domain's verdict: pass with an aligned SPF or DKIM pass; temperror when there is none but an aligned
        SPF or DKIM check failed for a while (it might have passed: RFC 7489 6.6.2 lets the receiver defer); else
        fail. The policy is carried either way, for reject_dmarc_policy."""
        if isinstance(discovered, str):
            return {"dmarc": discovered, "dmarc_domain": domain}
        record = discovered.record
        spf_aligned = self._aligned(split_address(mail_from)[1], domain, record.get("aspf", "r"))
        dkim_aligned = {r.result for r in dkim_results if self._aligned(r.domain, domain, record.get("adkim", "r"))}
        if (spf_aligned and spf_result == "pass") or "pass" in dkim_aligned:
            verdict = "pass"
        elif (spf_aligned and spf_result == "temperror") or "temperror" in dkim_aligned:
            verdict = "temperror"
        else:
            verdict = "fail"
        return {"dmarc": verdict, "dmarc_domain": domain, "dmarc_policy": discovered.policy}

    def _sampled(self, policy: str, pct: str) -> str:
        """The policy for this message: a message outside the pct= sample gets the next one down (RFC 7489
        6.6.4); a pct= that is not 0 to 100 is ignored (100)."""
        if not ascii_digits(pct):  # (RFC 7489: 1*3DIGIT; int() takes +1 and 1_0)
            return policy
        percent = int(pct)
        if not percent < 100 or self._rng.randrange(100) < percent:
            return policy
        return {"reject": "quarantine", "quarantine": "none"}.get(policy, policy)

    def _aligned(self, other: str, domain: str, mode: str) -> bool:
        other = normalise_domain(other)
        if mode == "s":
            return other == domain
        return bool(other) and self._org_domain(other) == self._org_domain(domain)

    def _org_domain(self, domain: str) -> str:
        """RFC 7489 3.2: the public suffix (an unlisted top-level domain is one, the PSL's "*" rule) and one
        label more."""
        assert self._psl is not None
        suffix = self._psl.get_tld(domain) or domain.rpartition(".")[2]
        labels = domain.split(".")
        return ".".join(labels[-(suffix.count(".") + 2):])

    async def _dmarc_record(self, domain: str) -> dict | None:
        """The tags of the domain's DMARC record; None when it has none, {} when it has more than one (a record
        that asks for nothing: RFC 7489 6.6.3 ends the discovery there, without a policy)."""
        try:
            records = await self._resolver.txt(f"_dmarc.{domain}")
        except NotFound:
            return None
        found = [r for r in records if _DMARC_VERSION.match(r)]
        if len(found) != 1:
            return {} if found else None
        tags = {}
        for item in found[0].split(";"):
            name, eq, value = item.partition("=")
            if eq:
                tags[name.strip().lower()] = value.strip().lower()
        return tags


POLICIES = ("none", "quarantine", "reject")
FROM_PARSE_LIMIT = 8192  # the From fields' characters parsed, in all (what lies past them is not checked)
AUTHOR_DOMAIN_LIMIT = 10  # the From domains one message's DMARC check looks up (two TXT questions each at most)
_VERDICT_STRICTNESS = ("pass", "none", "temperror", "fail")
# what reject_dmarc_policy does with a verdict under a policy: refuse (3), defer (2), hold (1); nothing else (0)
_ACTION_STRICTNESS = {("fail", "reject"): 3, ("temperror", "reject"): 2, ("temperror", "quarantine"): 2,
                      ("fail", "quarantine"): 1}
# RFC 7489 6.4: the record's first tag; "v" in any case, blanks around "=", the value "DMARC1" exactly
_DMARC_VERSION = re.compile(r"[vV][ \t]*=[ \t]*DMARC1[ \t]*(?:;|$)")


def _policy(record: dict, subdomain: bool) -> str | None:
    """What a record asks for: p=, or sp= (else p=) for a subdomain of the domain it was found at. A record
    without a valid p= (or with an invalid sp=) is p=none if it asks for reports (rua=), else no policy: None
    (RFC 7489 6.6.3). Either way it is the record: the organizational domain's is not asked then."""
    p = record.get("p", "")
    sp = record.get("sp", p)
    if p not in POLICIES or sp not in POLICIES:
        return "none" if record.get("rua") else None
    return sp if subdomain else p


class Authors(NamedTuple):
    domains: tuple[str, ...]  # each once, in the order found, at most AUTHOR_DOMAIN_LIMIT
    complete: bool  # whether these are all: no address without a domain, no domain past the limit


class Policy(NamedTuple):
    policy: str  # what the record asks for this message (after pct=): none, quarantine, reject
    record: dict  # its tags (aspf=, adkim=)


@dataclass(frozen=True)
class PolicyLookups:
    """The DMARC records of one message's authors, being looked up."""

    any_from: bool  # whether the message has a From field
    authors: Authors
    tasks: dict[asyncio.Task, str]  # each lookup and its domain

    def end(self) -> None:
        """Cancels the lookups still running and retrieves the exception of each that ended (asyncio logs one
        never retrieved: two lookups that raise at once, and the second was)."""
        for task in self.tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()


def _author_domains(froms: list[str]) -> Authors:
    """The domains of the From fields' addresses, lower case, A-labels (RFC 7489 6.6.1). Not complete when a field
    names no address (empty, a group) or one without a domain, with an invalid U-label or an address literal, when
    a field cannot be parsed (Python's parser recurses into comments: 500 '(' exhaust its stack), when there are
    more than AUTHOR_DOMAIN_LIMIT domains, or when the fields are longer than FROM_PARSE_LIMIT characters in all (the
    parser takes 0.2 s of the event loop over 100 KB of '@'): the fields are parsed one by one, no further than
    that, and the last address of a field cut there is not taken (it may be cut)."""
    domains: dict[str, None] = {}
    complete = True
    budget = FROM_PARSE_LIMIT
    for field in froms:
        whole = len(field) <= budget
        field = field[:budget]
        budget -= len(field)
        try:
            addresses = [address for _, address in email.utils.getaddresses([field])]
        except RecursionError:
            addresses = []
        complete = complete and whole and bool(addresses)
        for address in addresses if whole else addresses[:-1]:
            _, at, domain = address.rpartition("@")
            domain = normalise_domain(domain) if at else ""
            if not domain or domain.startswith("["):
                complete = False
            elif len(domains) == AUTHOR_DOMAIN_LIMIT and domain not in domains:
                return Authors(tuple(domains), False)
            else:
                domains[domain] = None
        if not whole:
            break
    return Authors(tuple(domains), complete)


def _decides(verdict: dict, complete: bool) -> bool:
    """Whether this domain's verdict is the message's, whatever the other domains' are: nothing is stricter."""
    return verdict.get("dmarc_policy") == "reject" and (verdict["dmarc"] == "fail" or not complete)


def _strictness(verdict: dict) -> tuple[int, int, int]:
    """How strict a domain's verdict is: first by what reject_dmarc_policy does with it (refuse, defer, hold: a
    temperror under p=reject outranks a failure under p=none), then by the verdict, then by the policy."""
    policy = verdict.get("dmarc_policy") or "none"
    return (_ACTION_STRICTNESS.get((verdict["dmarc"], policy), 0), _VERDICT_STRICTNESS.index(verdict["dmarc"]),
            POLICIES.index(policy))
