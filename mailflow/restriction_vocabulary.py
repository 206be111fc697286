"""The words of smtpd's restriction lists (Postfix SMTPD_ACCESS_README) and each item's argument check.

What it owns: which restriction names exist, which take an argument, what each argument must look like, and
which names can refuse relaying. `mailflow.config` validates every `smtpd.*_restrictions` item with
`check_item` when it loads (a misspelt list fails at start, naming the list and the item);
`mailflow.stages.smtpd.restrictions` evaluates the lists with the same words.

    STAGES, RCPT_STAGES                  the lists, in evaluation order (client … recipient run at RCPT; etrn
                                         at ETRN, after the client and helo lists)
    WITHOUT_ARGUMENT, WITH_ARGUMENT      the names; ACCESS_CHECKS: check_*_access -> what its keys are made of
                                         (check_ccert_access: the client certificate's fingerprints);
                                         CLIENT_CERT_PERMITS: the permits by TLS client certificate;
                                         SENDER_LOGIN_CHECKS: reject_*sender_login_mismatch -> what each refuses;
                                         WARN_IF_REJECT: the pseudo-item that makes the next item only warn;
                                         RHSBL_CHECKS: reject_rhsbl_* -> what is looked up; NEEDS_FILTER: the
                                         names that need a filter a restriction list must name to set it up
    SERVER_ACCESS_CHECKS                 check_*_{mx,ns,a}_access -> (what names the domain, "MX" | "NS" | "A");
                                         DNSWL_CHECKS: permit_dnswl_client, permit_rhswl_client -> what is looked up;
                                         LOGGED_PERMITS: the permits whose logging can be asked for, with
                                         PERMIT_VALUES (is_logged_permit; ALL_PERMITS, `static:all`: all);
                                         REVERSE_CLIENT_ACCESS: check_reverse_client_hostname_access
    RELAY_GUARDS                         the names that can refuse relaying (config requires one of them)
    ACCESS_ACTIONS                       the words an access table's value starts with that are actions, not
                                         restriction names (a restriction class may not be called so)
    restriction_items(words)             a Postfix restriction list's words as its items: `name argument`
                                         pairs kept together; list_setting_items(words, key): those of any list
                                         setting (a restriction list's so)
    split_item(text) -> (name, argument) the name in lower case (an old name, OLD_NAMES, as its new one: Postfix
                                         3.7's reject_invalid_hostname...), the argument stripped
    check_item(text, classes) -> text stripped   ValueError naming the problem; a name in `classes` (the
                                         restriction classes, smtpd_restriction_classes) is an item too
    check_classes(classes)               ValueError for a bad class name, or classes that name each other in a
                                         loop (check_item refuses an undefined one)
    expand(items, classes) -> names      the names of a list and of its classes' items, recursively (a set)
    relay_guard(label, items, classes) -> Found(GUARDED | PERMITTED | NEITHER, path, warned_guard, guard): the list
                                         reaches a relay guard or a permit of whatever the client chooses
                                         (is_client_chosen_permit: permit, permit_naked_ip_address, an access
                                         check of a permitting static: table) first, or neither (a warned guard
                                         does not count; a permit, in a class too, ends the search); the path
                                         says where

Why this module is a leaf outside `mailflow/stages/smtpd/`: importing any module under that package runs the
package's `__init__`, which imports the whole SMTP server (aiosmtpd, the session, the handler). The
configuration sits below every component and must import none of them; making smtpd's `__init__` lazy would
weaken what `from mailflow.stages.smtpd import Smtpd` promises and would need an exception in the layering rule
("config imports no stage"). So the vocabulary lives here, beside `mailflow.syntax`, and imports only leaves:
`syntax` (table specs, endpoints, IPv4), `address` (domain names) and `tables` (an inline or static table is
parsed now, so that its syntax error shows at start rather than at the first lookup).

Failure behaviour: `check_item` and `check_classes` raise ValueError with a reason fit for `FILE: KEY: REASON`;
nothing else raises.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, NamedTuple, Sequence

from mailflow.address import normalise_domain
from mailflow.dnsbl_sites import reply_filter
from mailflow.syntax import ascii_digits, parse_policy_service
from mailflow.tables import check_spec
from mailflow.tables.memory import table_entries

RCPT_STAGES = ("client", "helo", "sender", "relay", "recipient")
STAGES = RCPT_STAGES + ("data", "end_of_data", "etrn")

WITHOUT_ARGUMENT: tuple[str, ...] = (
    "permit", "reject", "defer", "permit_mynetworks", "permit_sasl_authenticated",
    "reject_unauth_destination", "defer_unauth_destination", "reject_unlisted_recipient",
    "reject_unknown_recipient_domain", "reject_non_fqdn_sender", "reject_non_fqdn_recipient",
    "reject_non_fqdn_helo_hostname", "reject_invalid_helo_hostname",
    "reject_unknown_client_hostname", "reject_unknown_reverse_client_hostname", "reject_unknown_sender_domain",
    "check_greylist", "reject_spf_fail", "reject_dmarc_policy", "reject_unverified_recipient",
    "reject_unverified_sender",
)
RHSBL_CHECKS = {  # reject_rhsbl_* -> what its query is made of
    "reject_rhsbl_client": "client", "reject_rhsbl_reverse_client": "reverse_client",
    "reject_rhsbl_sender": "sender", "reject_rhsbl_helo": "helo", "reject_rhsbl_recipient": "recipient",
}
ACCESS_CHECKS = {  # check_*_access -> what its keys are made of
    "check_client_access": "client", "check_helo_access": "helo",
    "check_sender_access": "sender", "check_recipient_access": "recipient", "check_etrn_access": "etrn",
}
# TLS client certificates (Postfix's permit_tls_clientcerts, permit_tls_all_clientcerts, check_ccert_access):
# the client's certificate fingerprints in relay_clientcerts, any certificate tls_ca_file verified, an access table
# keyed by the certificate's and its public key's fingerprints
CLIENT_CERT_PERMITS = ("permit_tls_clientcerts", "permit_tls_all_clientcerts")
ACCESS_CHECKS["check_ccert_access"] = "ccert"
WITHOUT_ARGUMENT += CLIENT_CERT_PERMITS
# The sender-login items (Postfix's reject_*sender_login_mismatch): name -> (authenticated: refuse a client logged
# in that does not own the sender; unauthenticated: refuse a client not logged in when the maps name an owner;
# allow_unknown: let a logged-in client use a sender no map lists), auth.SenderLogins.refusal's keywords.
# reject_sender_login_mismatch is reject_authenticated_sender_login_mismatch and
# reject_unauthenticated_sender_login_mismatch together, as Postfix documents it
SENDER_LOGIN_CHECKS = {
    "reject_sender_login_mismatch": (True, True, False),
    "reject_authenticated_sender_login_mismatch": (True, False, False),
    "reject_known_sender_login_mismatch": (True, True, True),
    "reject_unauthenticated_sender_login_mismatch": (False, True, False),
}
WARN_IF_REJECT = "warn_if_reject"  # not a restriction: the next item's refusals are only logged (reject_warning)
WITHOUT_ARGUMENT += (  # the items a Postfix main.cf names that need no DNS
    WARN_IF_REJECT, "reject_unauth_pipelining", "reject_multi_recipient_bounce", "reject_plaintext_session",
    "permit_auth_destination", "permit_naked_ip_address", "reject_unlisted_sender", *SENDER_LOGIN_CHECKS)
# the generic items that only mark the command: a later permit (defer_if_permit) or 5xx refusal (defer_if_reject)
# of it becomes `450 4.7.0 <x>: … rejected: defer_if_permit requested` (Postfix's wording), as the access actions
CONDITIONAL_DEFERRALS = ("defer_if_permit", "defer_if_reject")
WITHOUT_ARGUMENT += CONDITIONAL_DEFERRALS
ACCESS_CHECKS["check_sasl_access"] = "sasl"  # the key: the SASL login name, as it is (no other key)
WITH_ARGUMENT = tuple(ACCESS_CHECKS) + ("reject_rbl_client", "check_policy_service") + tuple(RHSBL_CHECKS)
# DNS-based items of Postfix's smtpd_check.c: a table asked with the MX, NS or A hosts of a name (check_server_access:
# name -> (what the name is, the record type)), DNS allowlists, MX backup and the HELO name's records
SERVER_ACCESS_CHECKS = {f"check_{subject}_{rr}_access": (subject.removesuffix("_hostname"), rr.upper())
                        for subject in ("client", "reverse_client_hostname", "helo", "sender", "recipient")
                        for rr in ("mx", "ns", "a")}
DNSWL_CHECKS = {"permit_dnswl_client": "client", "permit_rhswl_client": "client_name"}  # -> what is looked up
REVERSE_CLIENT_ACCESS = "check_reverse_client_hostname_access"  # check_client_access's keys, of the PTR name
WITHOUT_ARGUMENT += ("reject_unknown_helo_hostname", "permit_mx_backup")
WITHOUT_ARGUMENT += ("reject_maps_rbl",)  # (Postfix 3.7's old item: reject_rbl_client with each maps_rbl_domains)
# permit_inet_interfaces: the connection's client (after PROXY, before XCLIENT: Postfix's state->sockaddr) is this
# host; check_relay_domains: Postfix 3.7's old relay guard (permit a client named in relay_domains or an authorized
# destination, else refuse as reject_unauth_destination), warned of as going away
WITHOUT_ARGUMENT += ("permit_inet_interfaces", "check_relay_domains")
# the permits smtpd.log_access_permit_actions may name (Postfix's smtpd_acl_permit calls), and the access values
# that permit (OK, RELAY, DISCARD, an all-digit one: named by their word, any case)
LOGGED_PERMITS = ("permit", "permit_mynetworks", "permit_sasl_authenticated", "permit_tls_clientcerts",
                  "permit_tls_all_clientcerts", *DNSWL_CHECKS, "permit_mx_backup", "permit_auth_destination",
                  "permit_naked_ip_address", "permit_inet_interfaces", "check_relay_domains")
PERMIT_VALUES = ("OK", "RELAY", "DISCARD")  # (and an all-digit value)
PERMIT_VALUES_TEXT = ", ".join((*PERMIT_VALUES, "<digits>"))  # for the messages that name them
ALL_PERMITS = "static:all"  # log_access_permit_actions: every permit (Postfix's documented example)
WITH_ARGUMENT += tuple(SERVER_ACCESS_CHECKS) + tuple(DNSWL_CHECKS) + (REVERSE_CLIENT_ACCESS,)
# Restrictions that need a filter of [greylist] / [sender_auth], set up when a list (or a class it names) names
# them: one named only in an access table's value has none
NEEDS_FILTER = ("check_greylist", "reject_spf_fail", "reject_dmarc_policy")
KNOWN = WITHOUT_ARGUMENT + WITH_ARGUMENT
# the old names Postfix 3.7's smtpd_check.c still takes for these, with the same behaviour (split_item answers the
# new name, so nothing past it sees an old one)
OLD_NAMES = {"reject_invalid_hostname": "reject_invalid_helo_hostname",
             "reject_non_fqdn_hostname": "reject_non_fqdn_helo_hostname",
             "reject_unknown_hostname": "reject_unknown_helo_hostname",
             "reject_unknown_client": "reject_unknown_client_hostname",
             "reject_rbl": "reject_rbl_client", "check_recipient_maps": "reject_unlisted_recipient"}
RELAY_GUARDS = ("reject_unauth_destination", "defer_unauth_destination", "reject", "defer", "defer_if_permit",
                "check_relay_domains")  # (Postfix's rcpt_required)
ACCESS_ACTIONS = ("ok", "dunno", "reject", "defer", "defer_if_permit", "defer_if_reject", "discard", "hold",
                  "filter", "prepend", "redirect", "bcc", "warn", "info")
_CLASS_NAME = re.compile(r"[a-z0-9_][a-z0-9_.-]*")  # a main.cf parameter name, as Postfix's class names are


def is_logged_permit(name: str) -> bool:
    """`name` (any case) is a permit mailflow logs when log_access_permit_actions names it."""
    lower = name.lower()
    return lower in LOGGED_PERMITS or name.upper() in PERMIT_VALUES or (name.isascii() and name.isdigit())


def restriction_items(words: list[str]) -> list[str]:
    """The words of a Postfix restriction list (main.cf's `a, b c`, split at commas and blanks) as its items: a
    name that takes an argument and its argument are one (`check_client_access texthash:/etc/postfix/access`)."""
    items: list[str] = []
    pending = False
    for word in words:
        if pending:
            items[-1] += " " + word
            pending = False
        else:
            items.append(word)
            pending = current_name(word) in WITH_ARGUMENT
    return items


def list_setting_items(words: list[str], key: str) -> list[str]:
    """The words of a Postfix list as the items of mailflow's list setting `key` (restriction_items for a
    `*_restrictions` list): what `config import` writes, and what a config error suggests for such a list written
    as one string."""
    return restriction_items(words) if key.endswith("_restrictions") else words


def split_item(text: str) -> tuple[str, str]:
    name, _, arg = text.strip().partition(" ")
    return current_name(name), arg.strip()


def current_name(word: str) -> str:
    """A restriction name in lower case, an old one (OLD_NAMES) as its new name."""
    lower = word.lower()
    return OLD_NAMES.get(lower, lower)


def check_item(text: object, classes: Iterable[str] = ()) -> str:
    """Validate one list item (config calls this); returns it stripped, raises ValueError naming the problem.
    A name in `classes` (restriction class names, lower case) is an item without argument."""
    if not isinstance(text, str):
        raise ValueError("each restriction is a string: 'name' or 'name argument'")
    name, arg = split_item(text)
    if name in classes and name not in KNOWN:
        if arg:
            raise ValueError(f"restriction class {name!r} takes no argument (got {arg!r})")
        return text.strip()
    if name not in KNOWN:
        raise ValueError(f"unknown restriction {name!r}" if name else "empty restriction")
    if name in WITHOUT_ARGUMENT and arg:
        raise ValueError(f"{name!r} takes no argument (got {arg!r})")
    if name in WITH_ARGUMENT and not arg:
        raise ValueError(f"{name!r} needs an argument")
    if name in ACCESS_CHECKS or name in SERVER_ACCESS_CHECKS or name == REVERSE_CLIENT_ACCESS:
        _check_access_table(name, arg)
    if name == "check_policy_service":
        parse_policy_service(arg)
    if name == "reject_rbl_client" or name in RHSBL_CHECKS or name in DNSWL_CHECKS:
        rbl_domain, equals, wanted = arg.partition("=")
        try:
            filtered = not equals or bool(reply_filter(wanted))  # (D= is Postfix's "empty address pattern")
        except ValueError:
            filtered = False
        if not normalise_domain(rbl_domain) or not filtered:
            kind = "DNS allowlist" if name in DNSWL_CHECKS else "DNSBL"
            raise ValueError(f"{name}: {arg!r} is not a {kind} (domain, or domain=d.d.d.d where each d is a number "
                             "or [a..b] / [a;b;c], as 127.0.0.[2..11])")
    return text.strip()


def check_classes(classes: Mapping[str, Iterable[str]]) -> None:
    """The restriction classes (name -> items, each item already checked by check_item with these names): a name
    must be a word that is neither a restriction nor an access action, and no class may reach itself through
    the classes it names (Postfix's smtpd would recurse until it crashes)."""
    for name in classes:
        if not _CLASS_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: a restriction class name is a word of letters, digits, '_', '.' and '-'")
        if name in KNOWN or name in OLD_NAMES or name in ACCESS_ACTIONS:
            raise ValueError(f"{name!r}: a restriction class cannot have the name of a restriction or an access "
                             "action")
    _refuse_loops(classes)


def _refuse_loops(classes: Mapping[str, Iterable[str]]) -> None:
    """ValueError naming the first loop of classes found; a depth-first walk with an explicit stack (a chain of
    thousands of classes is no recursion), each class walked once however often it is named."""
    free: set[str] = set()  # classes found to reach no loop
    for start in classes:
        path, on_path, todo = [start], {start}, [iter(classes[start])]
        while todo:
            item = next(todo[-1], None)
            if item is None:
                free.add(path[-1])
                on_path.discard(path.pop())
                todo.pop()
                continue
            word = split_item(item)[0]
            if word not in classes or word in free:
                continue
            if word in on_path:
                raise ValueError(f"{path[0]}: the restriction classes loop: {' -> '.join(path + [word])}")
            path.append(word)
            on_path.add(word)
            todo.append(iter(classes[word]))


def expand(items: Iterable[str], classes: Mapping[str, Iterable[str]]) -> set[str]:
    """The names of `items` and of the items of the classes they name, recursively (no loops: config refused
    them; each class is walked once)."""
    names: set[str] = set()
    seen: set[str] = set()
    todo = list(items)
    while todo:
        name = split_item(todo.pop())[0]
        if name not in classes:
            names.add(name)
        elif name not in seen:
            seen.add(name)
            todo += classes[name]
    return names


def relay_guard(label: str, items: Sequence[str], classes: Mapping[str, Sequence[str]]) -> Found:
    """Whether the list `label` can refuse relaying: GUARDED when it reaches one of RELAY_GUARDS, in the list or
    in a class it names (at any depth), before any item that permits whatever the client chooses (what follows
    it never runs: `permit, reject_unauth_destination` is an open relay), PERMITTED when it reaches such a
    permit first, else NEITHER. Those permits (is_client_chosen_permit): `permit`, `permit_naked_ip_address`
    (the client chooses its HELO) and a check_*_access of a static: table whose value permits. An item after a
    run of warn_if_reject refuses nothing, yet a warned permit still permits. Stricter than Postfix's
    has_required on purpose: a class that reaches a permit before a guard ends the outer list's search too (as
    it ends the list at runtime), where Postfix searches on after the class. Classes that name each other in a
    loop were refused before (check_classes). Found.path says where, `relay_restrictions[1] c1 -> c1[0] permit`;
    with NEITHER, Found.warned_guard the first guard met only under warn_if_reject, if any."""
    return _reaches(label, items, {name.lower(): value for name, value in classes.items()})


GUARDED, PERMITTED, NEITHER = "guarded", "permit reached", "neither"  # what a walk of a list meets first
_PERMIT_ACCESS_VALUES = ("ok", "relay", "permit", "permit_naked_ip_address")  # and an all-digit value


class Found(NamedTuple):
    result: str  # GUARDED, PERMITTED or NEITHER
    path: tuple[str, ...] = ()  # the items that lead to it, `list[index] item`, outer first (_led_by: shortened)
    warned_guard: tuple[str, ...] = ()  # NEITHER: the path to the first guard met under warn_if_reject
    guard: str = ""  # NEITHER with a warned_guard: that guard's item (`reject_unauth_destination`)

    def where(self) -> str:
        """The path for a message: its first three and last two steps when it is longer."""
        return " -> ".join(self.path or self.warned_guard)


def _led_by(here: str, steps: tuple[str, ...]) -> tuple[str, ...]:
    """`here` then `steps`, kept to what Found.where prints: past six steps, the first three, "..." and the last
    two (so a chain of thousands of classes holds a few steps per class walked, not its whole path)."""
    steps = (here, *steps)
    return steps if len(steps) <= 6 else (*steps[:3], "...", *steps[-2:])


def is_client_chosen_permit(item: str) -> bool:
    """`item` permits whatever the client sends: `permit`, `permit_naked_ip_address` (it permits a client that
    says `HELO 198.51.100.7`), or a check_*_access of a static: table whose value's first word is OK, RELAY or a
    permit, or whose whole value is digits (Postfix's check_table_result: `550 go away` is a reject; every key
    answers it)."""
    name, arg = split_item(item)
    if name in ("permit", "permit_naked_ip_address"):
        return True
    if name not in ACCESS_CHECKS and name not in SERVER_ACCESS_CHECKS and name != REVERSE_CLIENT_ACCESS:
        return False
    if not arg.lower().startswith("static:"):
        return False
    entries = table_entries(arg) or ()
    values = [value.strip() for _, value in entries if value.split()]
    return bool(values) and all(v.split()[0].lower() in _PERMIT_ACCESS_VALUES or ascii_digits(v) for v in values)


class _Walk:
    """One list or class being walked: where it is, whether it is warned, the first warned guard met."""

    def __init__(self, label: str, items: Sequence[str], warned: bool):
        self.label, self.items, self.warned = label, items, warned
        self.at, self.warn_next = 0, False
        self.warned_guard: tuple[str, ...] = ()
        self.guard = ""

    def advance(self, classes: Mapping[str, Sequence[str]],
                known: dict[tuple[str, bool], Found]) -> Found | tuple[str, bool]:
        """This walk's Found, or the (class, warned) it needs first (not in `known` yet)."""
        while self.at < len(self.items):
            item = self.items[self.at]
            name = split_item(item)[0]
            here = f"{self.label}[{self.at}] {item.strip()}"
            if name == WARN_IF_REJECT:
                self.warn_next, self.at = True, self.at + 1
                continue
            item_warned = self.warned or self.warn_next
            if name in classes:
                if (name, item_warned) not in known:
                    return name, item_warned
                found = known[(name, item_warned)]
                if found.result != NEITHER:
                    return found._replace(path=_led_by(here, found.path))
                if found.warned_guard and not self.warned_guard:
                    self.warned_guard, self.guard = _led_by(here, found.warned_guard), found.guard
            elif is_client_chosen_permit(item):
                return Found(PERMITTED, (here,))
            elif name in RELAY_GUARDS:
                if not item_warned:
                    return Found(GUARDED, (here,))
                if not self.warned_guard:
                    self.warned_guard, self.guard = (here,), item.strip()
            self.warn_next, self.at = False, self.at + 1
        return Found(NEITHER, (), self.warned_guard, self.guard)


def _reaches(label: str, items: Sequence[str], classes: Mapping[str, Sequence[str]]) -> Found:
    """The walk behind relay_guard, with an explicit stack (a chain of thousands of classes is no recursion).
    Each class's Found is computed once per warned state: it depends only on the class's items and on being
    warned, never on where the class is named (a warn_if_reject at a class's end does not carry out of it, as
    in Postfix)."""
    known: dict[tuple[str, bool], Found] = {}
    stack = [_Walk(label, items, False)]
    while True:
        walk = stack[-1]
        step = walk.advance(classes, known)
        if isinstance(step, Found):
            stack.pop()
            if not stack:
                return step
            known[(walk.label, walk.warned)] = step
        else:
            stack.append(_Walk(step[0], classes[step[0]], step[1]))


def _check_access_table(name: str, spec: str) -> None:
    try:
        check_spec(spec)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
