"""The smtpd restrictions that ask about the servers of a domain, as Postfix 3.7's smtpd_check.c does:
check_{client,reverse_client_hostname,helo,sender,recipient}_{mx,ns,a}_access (its check_server_access) and
permit_mx_backup with permit_mx_backup_networks. restrictions.py decides when each runs and asks the access table;
this module asks the resolver.

    ServerChecks(resolver, rewriter, mx_backup_networks)
        .servers(rr, name, reply_name, reply_class)   async iterator of what check_server_access asks the table, in
                                                      its order: ("name", host) for each MX or NS host (its parent
                                                      domains are the caller's keys), then ("address", ip) for each
                                                      of that host's addresses; the caller stops at the first entry
                                                      found. `name` is a host name or an address (its domain).
        .mx_backup(rcpt, facts) -> bool               permit_mx_backup: the recipient's domain is this host's or a
                                                      relay domain, or lists this host as an MX host, not among the
                                                      best ones (whose addresses must all be in
                                                      permit_mx_backup_networks when that is set)

check_server_access: an MX lookup that finds no MX (no such name, or no record of the type) makes the name its own
MX host, as Postfix's implicit MX; a null MX asks nothing. An NS lookup that finds none asks the parent domains,
up to the top-level domain. "A" asks the name's own addresses only. An address literal (`[192.0.2.1]`) is its own
MX and A host, and has no NS. Bounds: at most SERVER_LIMIT hosts and SERVER_LIMIT addresses in all (Postfix's
dns_rr_list_limit, its warning past it), an NS lookup per label of the name at most (a name has 127 at most);
each lookup is bounded by the resolver ([dns] timeout x tries), and one check (a name's servers, permit_mx_backup)
by CHECK_LOOKUPS such lookups' time: past it the rest is not asked (logged; permit_mx_backup then acts as for a
lookup that fails). The answers of a check are kept in the session's memo (`Lookups`, one entry per check), so the
RCPTs of a session (delay_reject reruns the client, helo and sender lists at each) ask them once; the addresses
of LOOKUPS_AHEAD server hosts are asked together.

permit_mx_backup (Postfix's), of the recipient as trivial-rewrite resolves it (qualified, the percent hack undone): a
routed one (Rewriter's is_routed: `user%victim@backup`, Postfix's RESOLVE_FLAG_ROUTED) is not permitted; one of this
host's domains or of relay_domains is; an address literal is not; otherwise the domain's MX hosts are split into
the best (lowest preference) and the others: this host must be one of the others and none of the best, by name
(mydestination, this host's address literals) or by address (this server's listener addresses and
proxy_interfaces: Rewriter.own_addresses).

Failure behaviour, as Postfix's: server access with a lookup that fails asks nothing more about that host and logs
`Unable to look up MX host ...`; permit_mx_backup with a lookup that fails permits nothing and, as a
DEFER_IF_REJECT (450 4.4.4), turns a later 5xx refusal of the recipient into a deferral. classify may raise
LookupRetry (a domain list's table); nothing else raises.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, AsyncGenerator

from mailflow import address, status
from mailflow.dns import MX, InvalidReply, NonRecoverable, NotFound, is_ip_literal
from mailflow.errors import LookupRetry
from mailflow.model import AddressClass
from mailflow.routing.rewrite import is_routed

if TYPE_CHECKING:
    from mailflow.stages.smtpd.restrictions import Facts
    from mailflow.tables.networks import NetworkList

log = logging.getLogger("mailflow.smtpd")

SERVER_LIMIT = 100  # MX/NS hosts, and their addresses in all, one check asks about (Postfix's dns_rr_list_limit)
CHECK_LOOKUPS = 3  # one check takes at most the time of this many lookups ([dns] timeout x tries each)
LOOKUPS_AHEAD = 5  # server hosts whose addresses are looked up together
# What Postfix's getaddrinfo-based lookups of a server host say (gai_strerror), by what the resolver found
NO_SUCH_HOST = "Name or service not known"
NO_ADDRESS = "No address associated with hostname"
LOOKUP_FAILED = "Temporary failure in name resolution"


def dns_why(error: BaseException | None) -> str:
    """What Postfix's dns_strerror says: the resolver's reason (`Host not found, try again`); "Host not found" for a
    name that does not exist; None: the name has no record of the type."""
    if error is None:
        return "Host found but no data record of requested type"
    if isinstance(error, LookupRetry):
        return error.reason.rpartition(": ")[2]
    return "Host not found"


class Lookups:
    """The DNS questions of one check (one name's servers, one permit_mx_backup domain): each answer (a failure too)
    kept in `answers` (an entry of the session's memo, so a later RCPT asks nothing again), all asked before
    `deadline` (loop time; TimeoutError past it, nothing kept). Raise NotFound or LookupRetry as the resolver."""

    def __init__(self, resolver, answers: dict, deadline: float):
        self._resolver = resolver
        self._answers = answers
        self._deadline = deadline

    async def mx(self, domain: str) -> list[MX]:
        return await self._ask("MX", domain)

    async def ns(self, domain: str) -> list[str]:
        return await self._ask("NS", domain)

    async def addresses(self, host: str) -> list[str]:
        return await self._ask("A", host)

    async def prefetch_addresses(self, hosts: list[str]) -> None:
        """The addresses of `hosts` asked together (each kept as `addresses` would keep it)."""
        wanted = [h for h in dict.fromkeys(hosts) if ("A", h) not in self._answers]
        if len(wanted) > 1:
            await asyncio.gather(*(self.addresses(h) for h in wanted), return_exceptions=True)

    async def _ask(self, qtype: str, name: str):
        key = (qtype, name)
        if key not in self._answers:
            query = {"MX": self._resolver.mx, "NS": self._resolver.ns, "A": self._resolver.addresses}[qtype]
            try:
                async with asyncio.timeout_at(self._deadline):
                    self._answers[key] = (await query(name), None)
            except (NotFound, LookupRetry) as e:
                self._answers[key] = (None, e.with_traceback(None))
        found, error = self._answers[key]
        if error is not None:
            raise error.with_traceback(None)  # (each raise would lengthen a kept traceback, holding its frames)
        return found


class ServerChecks:
    """See the module docstring. Without a resolver nothing is asked (no opinion). `lookup_time`: the longest one
    lookup takes ([dns] timeout x tries); a check takes CHECK_LOOKUPS of them at most."""

    def __init__(self, resolver, rewriter, mx_backup_networks: NetworkList, lookup_time: float = 10.0):
        self._resolver = resolver
        self._rewriter = rewriter
        self._networks = mx_backup_networks
        self._check_time = CHECK_LOOKUPS * lookup_time

    def _lookups(self, memo: dict, *key: str) -> Lookups:
        """The lookups of one check, its answers kept in the session's `memo` under one entry."""
        answers = memo.setdefault(("server lookups", *key), {})
        return Lookups(self._resolver, answers, asyncio.get_running_loop().time() + self._check_time)

    # -------------------------------------------------------------------------------- check_server_access

    async def servers(self, rr: str, name: str, reply_name: str, reply_class: str, memo: dict
                      ) -> AsyncGenerator[tuple[str, str], None]:
        """("name", host) and ("address", ip), in the order Postfix's check_server_access asks the table (see the
        module docstring); `rr` is "MX", "NS" or "A"; `memo`: the session's (the answers are kept there). Past the
        check's time what is left is not asked (logged)."""
        if self._resolver is None:
            return
        domain = name.rpartition("@")[2]
        if domain.startswith("["):
            literal = address.literal_ip(domain) if rr != "NS" else None
            if literal is not None:
                yield "address", literal
            return
        domain = address.normalise_domain(domain)
        if not domain:
            return
        lookups = self._lookups(memo, rr, domain)
        try:
            hosts = [domain] if rr == "A" else await self._server_hosts(lookups, rr, domain, name)
            counted = 0
            for i, host in enumerate(hosts):
                if is_ip_literal(host):  # (an MX or NS "name" that is an address)
                    yield "address", host
                    continue
                if rr != "A":
                    yield "name", host
                await lookups.prefetch_addresses([h for h in hosts[i:i + LOOKUPS_AHEAD] if not is_ip_literal(h)])
                for ip in await self._host_addresses(lookups, host, rr, reply_name, reply_class):
                    counted += 1
                    if counted > SERVER_LIMIT:
                        log.warning("check_server_access: %s server address count limit (%d) exceeded for %s %s -- "
                                    "ignoring the remainder", rr, SERVER_LIMIT, reply_class, reply_name)
                        return
                    yield "address", ip
        except TimeoutError:
            log.warning("check_server_access: %s lookups for %s %s took over %.0fs -- ignoring the remainder",
                        rr, reply_class, reply_name, self._check_time)

    async def _server_hosts(self, lookups: Lookups, rr: str, domain: str, name: str) -> list[str]:
        """The MX (implicit: the domain itself when it has none; [] for a null MX) or NS hosts of `domain`; [] when
        the DNS cannot tell (logged, as Postfix)."""
        try:
            if rr == "MX":
                try:
                    records = await lookups.mx(domain)
                except NotFound:
                    records = []
                if any(r.is_null for r in records):
                    return []
                return [r.host for r in _limited(records, domain, "MX")] or [domain]
            return await self._name_servers(lookups, domain, name)
        except LookupRetry as e:
            log.warning("Unable to look up %s host for %s: %s", rr, domain, dns_why(e))
            return []

    async def _name_servers(self, lookups: Lookups, domain: str, name: str) -> list[str]:
        """The NS hosts of `domain`, else of its nearest parent that has some (Postfix walks up to the top-level
        domain); [] when there are none or the DNS cannot tell (logged, naming the domain asked last)."""
        current = domain
        while True:
            try:
                found = await lookups.ns(current)
            except NotFound:
                found = []
            except LookupRetry as e:
                log.warning("Unable to look up NS host for %s: %s", current, dns_why(e))
                return []
            if found:
                return _limited(found, current, "NS")
            _, dot, parent = current.partition(".")
            if not dot or not parent:
                log.warning("Unable to look up NS host for %s: Host not found", name)
                return []
            current = parent

    async def _host_addresses(self, lookups: Lookups, host: str, rr: str, reply_name: str, reply_class: str
                              ) -> list[str]:
        """The addresses of a server host; [] when it has none or the DNS cannot tell (an MX or NS host: logged)."""
        found, why = await _addresses_or_why(lookups, host)
        if why and rr != "A":
            log.warning("Unable to look up %s host %s for %s %s: %s", rr, host, reply_class, reply_name, why)
        return found

    # -------------------------------------------------------------------------------- permit_mx_backup

    async def mx_backup(self, rcpt: str, facts: Facts) -> bool:
        """permit_mx_backup (see the module docstring); a lookup that fails sets facts.defer_if_reject (450 4.4.4),
        and so does one past the check's time (logged). May raise LookupRetry (the recipient's class)."""
        if self._resolver is None:
            return False
        resolved = self._rewriter.resolved_address(rcpt)  # (`user%elsewhere` is user@elsewhere, `user` user@myorigin)
        domain = address.normalise_domain(address.split(resolved)[1])
        if not domain or is_routed(resolved):
            return False
        if self._rewriter.classify_resolved(resolved) is not AddressClass.DEFAULT:
            return True
        if domain.startswith("["):
            return False
        try:
            return await self._backup_mx_of(self._lookups(facts.memo, "mx_backup", domain), domain, rcpt, facts)
        except TimeoutError:
            log.warning("permit_mx_backup: lookups for %s took over %.0fs", domain, self._check_time)
            _defer_if_reject(facts, rcpt, "Unable to look up mail exchanger information: Host not found, try again")
            return False

    async def _backup_mx_of(self, lookups: Lookups, domain: str, rcpt: str, facts: Facts) -> bool:
        """This host is an MX host of `domain`, not among the best ones (which must all be in
        permit_mx_backup_networks when that is set)."""
        try:
            records = _limited(await lookups.mx(domain), domain, "MX")
        except (NotFound, InvalidReply, NonRecoverable):  # (Postfix defers only for DNS_RETRY)
            return False
        except LookupRetry as e:
            _defer_if_reject(facts, rcpt, f"Unable to look up mail exchanger information: {dns_why(e)}")
            return False
        if not records or any(r.is_null for r in records):
            return False
        best = [r.host for r in records if r.preference == records[0].preference]
        others = [r.host for r in records if r.preference != records[0].preference]
        if await self._i_am_mx(lookups, best, rcpt, facts) or not others or \
                not await self._i_am_mx(lookups, others, rcpt, facts):
            return False
        return not self._networks or await self._best_in_networks(lookups, best, rcpt, facts)

    async def _i_am_mx(self, lookups: Lookups, hosts: list[str], rcpt: str, facts: Facts) -> bool:
        """One of `hosts` is this host: by name first (Postfix's resolve_local), then by address (has_my_addr)."""
        if any(self._rewriter.resolve_local(address.normalise_domain(h)) for h in hosts):
            return True
        own = self._rewriter.own_addresses
        for i, host in enumerate(hosts):
            await lookups.prefetch_addresses(hosts[i:i + LOOKUPS_AHEAD])
            found, why = await _addresses_or_why(lookups, host)
            if why:
                _defer_if_reject(facts, rcpt, f"Unable to look up mail exchanger host {host}: {why}")
            if any(ipaddress.ip_address(ip) in own for ip in found):
                return True
        return False

    async def _best_in_networks(self, lookups: Lookups, best: list[str], rcpt: str, facts: Facts) -> bool:
        """Every address of every best MX host is in permit_mx_backup_networks (Postfix's permit_mx_primary)."""
        for host in best:
            try:
                found = await lookups.addresses(host)
                error: BaseException | None = None
            except (NotFound, LookupRetry) as e:
                found, error = [], e
            if not found:
                _defer_if_reject(facts, rcpt, f"Unable to look up host {host} as mail exchanger: {dns_why(error)}")
                return False
            for ip in found:
                try:
                    if not self._networks.holds(ip, host):
                        return False
                except LookupRetry:
                    log.warning("all_auth_mx_addr: permit_mx_backup_networks lookup error for address %s for %s",
                                ip, host)
                    _defer_if_reject(facts, rcpt, f"Unable to verify host {host} as mail exchanger")
                    return False
        return True


async def _addresses_or_why(lookups: Lookups, host: str) -> tuple[list[str], str]:
    """(the addresses of `host`, "") or ([], why there are none in getaddrinfo's words, as Postfix reports its
    lookups of server hosts)."""
    try:
        found = await lookups.addresses(host)
    except NotFound:
        return [], NO_SUCH_HOST
    except LookupRetry:
        return [], LOOKUP_FAILED
    return found, "" if found else NO_ADDRESS


def _limited(records: list, qname: str, qtype: str) -> list:
    """The first SERVER_LIMIT records, the others dropped with Postfix's warning (dns_rr_append_with_limit)."""
    if len(records) > SERVER_LIMIT:
        log.warning("DNS record count limit (%d) exceeded -- dropping excess record(s) after qname=%s qtype=%s",
                    SERVER_LIMIT, qname, qtype)
    return records[:SERVER_LIMIT]


def _defer_if_reject(facts: Facts, rcpt: str, text: str) -> None:
    """Postfix's DEFER_IF_REJECT3/4 of permit_mx_backup: a later 5xx refusal is this 450 4.4.4 (the first one kept)."""
    facts.defer_if_reject = facts.defer_if_reject or status.conditional_deferral(rcpt, "Recipient address", text,
                                                                                  "4.4.4")
