"""Seeded restriction lists in combination, and short sessions to try them with, for the differential test against
Postfix (tests/interop/test_restriction_lists_vs_postfix.py).

- `generated(seed)`: one `Combination` drawn from `random.Random(seed)`: lists of 1-5 items (client, helo, sender,
  relay, recipient, data, end_of_data) from a pool that needs no DNS, two restriction classes (`c1` may name `c2`),
  access tables written inline whose values are actions, restrictions or class names, smtpd_delay_reject,
  smtpd_helo_required, strict_rfc821_envelopes, smtpd_reject_unlisted_sender and _recipient,
  unknown_local_recipient_reject_code, and a few sessions (XCLIENT, HELO/EHLO, MAIL, RCPTs, VRFY, DATA).
- `extended(combination)` (by `generated` unless `extend=False`): from a stream of its own, so the base draws of a
  seed stay as they were: an etrn list with ETRN commands, access keys in address forms, the items that ask the
  envelope or the session anywhere, BDAT in place of DATA, commands pipelined in one write (joined by PIPELINED).
- `more_items(combination)` (by `generated` when `more`, as `extend` unless told): from a third stream, so the base and
  extended draws stay as they were: Postfix 3.7's permit_inet_interfaces and check_relay_domains in any list or
  class, and smtpd_null_access_lookup_key another than `<>` with a sender table keyed by it.
- `Combination.main_cf()`: Postfix's settings for it; `Combination.mailflow()`: mailflow's, alike.

The relay list always ends with `reject_unauth_destination` (both servers refuse to start an open relay). The
clients are 127.0.0.1 (the connection), 127.0.0.2 (XCLIENT, in mynetworks) and 192.0.2.1-3 (XCLIENT, outside).
Every session connects from 127.0.0.1, an address both servers listen on (Postfix's inet_interfaces): so
permit_inet_interfaces permits every client XCLIENT names, as Postfix's asks the connection's address.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

LISTS = ("client", "helo", "sender", "relay", "recipient", "data", "end_of_data")
ALL_LISTS = LISTS + ("etrn",)  # (the etrn list is drawn by `extended`, from its own stream)
KEYS = {
    "client": ["192.0.2.1", "192.0.2.2", "192.0.2", "127.0.0.2"],
    "helo": ["good.test", "bad.test", "nodot"],
    "sender": ["s1@remote.test", "s2@remote.test", "remote.test", "alice@local.test"],
    "recipient": ["r1@relay.test", "r2@relay.test", "relay.test", "alice@local.test", "x@elsewhere.test"],
}
ACTIONS = ["OK", "DUNNO", "REJECT", "REJECT no way", "DEFER", "DEFER later", "DEFER_IF_PERMIT dip",
           "DEFER_IF_REJECT dir", "HOLD", "HOLD held", "DISCARD", "DISCARD gone", "WARN watch", "INFO note",
           "450 4.7.0 busy", "550 5.7.1 go away", "553 5.1.2 bad address", "PREPEND X-Tag: yes",
           "permit_mynetworks", "permit_mynetworks, reject", "reject_non_fqdn_sender", "defer_if_permit",
           "warn_if_reject reject", "reject_unauth_destination", "reject_unlisted_recipient", "c1", "c2",
           "421 4.7.0 closing", "521 5.7.1 bye", "FILTER smtp:[127.0.0.1]:9", "REDIRECT other@relay.test",
           "BCC copy@relay.test"]
PLAIN_ITEMS = ["permit", "reject", "defer", "defer_if_permit", "defer_if_reject", "warn_if_reject",
               "permit_mynetworks", "reject_unauth_pipelining", "reject_non_fqdn_helo_hostname",
               "reject_invalid_helo_hostname", "reject_non_fqdn_sender", "reject_non_fqdn_recipient",
               "reject_unlisted_recipient", "reject_unauth_destination",
               "defer_unauth_destination", "permit_auth_destination", "reject_multi_recipient_bounce"]
# only in the sender list: elsewhere Postfix checks it once per run of smtpd_check_mail (which resets its
# sender_rcptmap_checked: at MAIL, and with delay_reject = yes at each RCPT, after the client and helo lists), so
# with no a later RCPT passes, and with yes every other RCPT passes with it in the client or helo list (seed 63),
# and a VRFY in a transaction or a second list of one RCPT skips it; mailflow checks it wherever met (drawn
# outside the sender list with delay_reject = yes, seeds 63, 286 and 393 of 1-400 differed so)
SENDER_ITEMS = ["reject_unlisted_sender"]
TABLE_ITEMS = {"check_client_access": "client", "check_helo_access": "helo", "check_sender_access": "sender",
               "check_recipient_access": "recipient"}
CLIENTS = ["XCLIENT ADDR=127.0.0.2 NAME=[UNAVAILABLE]", "XCLIENT ADDR=192.0.2.1 NAME=[UNAVAILABLE]",
           "XCLIENT ADDR=192.0.2.2 NAME=[UNAVAILABLE]", "XCLIENT ADDR=192.0.2.3 NAME=[UNAVAILABLE]"]
HELLOS = ["EHLO good.test", "HELO bad.test", "EHLO nodot", "EHLO [192.0.2.9]", "EHLO bad_name!"]
SENDERS = ["<s1@remote.test>", "<s2@remote.test>", "<>", "<alice@local.test>", "<nobody@local.test>",
           "<nodomain>", "s1@remote.test"]
RECIPIENTS = ["<r1@relay.test>", "<r2@relay.test>", "<alice@local.test>", "<nobody@local.test>",
              "<x@elsewhere.test>", "<nodomain>", "r1@relay.test"]
MESSAGE = "Subject: combination\r\n\r\nbody\r\n."
# drawn by `extended` only (its own stream: the base draws of a seed stay as they were)
ETRN_KEYS = ["relay.test", "elsewhere.test", "local.test"]
ETRN_ITEMS = ["permit", "reject", "defer_if_permit", "defer_if_reject", "warn_if_reject", "permit_mynetworks",
              "reject_unauth_pipelining", "reject_non_fqdn_helo_hostname", "reject_invalid_helo_hostname"]
# the address forms of an access table's keys (user@, domain, <> for the null sender: smtpd_null_access_lookup_key)
ADDRESS_KEYS = {"sender": ["<>", "s1@", "nobody@", "local.test", "remote.test", "s1@remote.test"],
                "recipient": ["r1@", "alice@", "nobody@", "local.test", "elsewhere.test", "nodomain"]}
EXTRA_ITEMS = ["reject_sender_login_mismatch", "reject_unauth_pipelining", "reject_multi_recipient_bounce",
               "permit_auth_destination", "reject_unlisted_recipient", "reject_non_fqdn_recipient"]
# (no flush domain, relay.test: Postfix's fast flush answered 250 for it, and after some 200 combinations of a
# long run 459 for every later one, cause not found; a site past the lists gets 459 on both sides)
ETRNS = ["ETRN elsewhere.test", "ETRN @elsewhere.test", "ETRN #local.test", "ETRN bad!name", "ETRN",
         "ETRN [192.0.2.9]"]
# a BDAT transaction's one chunk, sent with its command (`replay_one` shows the command line only)
BDAT_BODY = "Subject: chunked\r\n\r\nbody\r\n"
BDAT = f"BDAT {len(BDAT_BODY)} LAST\r\n{BDAT_BODY}"
PIPELINED = "\r\n"  # commands joined so are sent in one write, their replies read after


@dataclass
class Combination:
    seed: int
    lists: dict[str, list[str]] = field(default_factory=dict)
    classes: dict[str, list[str]] = field(default_factory=dict)
    delay_reject: bool = True
    helo_required: bool = False
    strict_rfc821: bool = False
    unlisted_sender: bool = False  # smtpd_reject_unlisted_sender
    unlisted_recipient: bool = True  # smtpd_reject_unlisted_recipient
    unknown_local_code: int = 550  # unknown_local_recipient_reject_code
    null_key: str = "<>"  # smtpd_null_access_lookup_key (another drawn by `more` only)
    sessions: list[list[str]] = field(default_factory=list)

    def main_cf(self) -> dict[str, str]:
        return {
            **{f"smtpd_{name}_restrictions": ", ".join(self.lists.get(name, [])) for name in ALL_LISTS},
            "smtpd_restriction_classes": ", ".join(self.classes),
            **{name: ", ".join(items) for name, items in self.classes.items()},
            "smtpd_delay_reject": yes(self.delay_reject), "smtpd_helo_required": yes(self.helo_required),
            "strict_rfc821_envelopes": yes(self.strict_rfc821),
            "smtpd_reject_unlisted_sender": yes(self.unlisted_sender),
            "smtpd_reject_unlisted_recipient": yes(self.unlisted_recipient),
            "unknown_local_recipient_reject_code": str(self.unknown_local_code),
            "smtpd_null_access_lookup_key": self.null_key,
        }

    def mailflow(self) -> dict:
        return {**{f"{name}_restrictions": self.lists.get(name, []) for name in ALL_LISTS},
                "restriction_classes": self.classes, "delay_reject": self.delay_reject,
                "helo_required": self.helo_required, "strict_rfc821_envelopes": self.strict_rfc821,
                "reject_unlisted_sender": self.unlisted_sender, "reject_unlisted_recipient": self.unlisted_recipient,
                "unknown_local_recipient_reject_code": self.unknown_local_code, "null_access_lookup_key": self.null_key}

    def describe(self) -> str:
        lines = [f"seed {self.seed}: delay_reject={yes(self.delay_reject)} helo_required={yes(self.helo_required)}"
                 f" strict_rfc821_envelopes={yes(self.strict_rfc821)}"
                 f" reject_unlisted_sender={yes(self.unlisted_sender)}"
                 f" reject_unlisted_recipient={yes(self.unlisted_recipient)}"
                 f" unknown_local_recipient_reject_code={self.unknown_local_code}"
                 + (f" smtpd_null_access_lookup_key={self.null_key}" if self.null_key != "<>" else "")]
        lines += [f"  {name}: {', '.join(items)}" for name, items in {**self.lists, **self.classes}.items()]
        return "\n".join(lines)


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def table(rng: random.Random, kind: str) -> str:
    """An inline access table of 1-3 entries for `kind`'s keys."""
    entries = {key: rng.choice(ACTIONS) for key in rng.sample(KEYS[kind], rng.randint(1, 3))}
    return "inline:{ " + ", ".join(f"{{{key}={value}}}" for key, value in entries.items()) + " }"


def item(rng: random.Random, classes: list[str], list_name: str = "") -> str:
    roll = rng.random()
    if list_name == "sender" and roll < 0.05:
        return rng.choice(SENDER_ITEMS)
    if roll < 0.35:
        name = rng.choice(list(TABLE_ITEMS))
        return f"{name} {table(rng, TABLE_ITEMS[name])}"
    if roll < 0.45 and classes:
        return rng.choice(classes)
    return rng.choice(PLAIN_ITEMS)


def items(rng: random.Random, classes: list[str], list_name: str = "") -> list[str]:
    return [item(rng, classes, list_name) for _ in range(rng.randint(1, 5))]


def session(rng: random.Random) -> list[str]:
    commands = [rng.choice(CLIENTS)] if rng.random() < 0.7 else []
    if rng.random() < 0.85:
        commands.append(rng.choice(HELLOS))
    for transaction in range(rng.choice([1, 1, 2])):
        if transaction:
            commands.append("RSET")
        commands.append(f"MAIL FROM:{rng.choice(SENDERS)}")
        commands += [f"RCPT TO:{rng.choice(RECIPIENTS)}" for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2:
            commands.append(f"VRFY {rng.choice(RECIPIENTS).strip('<>')}")
        if rng.random() < 0.6:
            commands += ["DATA", MESSAGE]
    return commands + ["QUIT"]


def generated(seed: int, extend: bool = True, more: bool | None = None,
              postfix_keeps_refused_transactions: bool = True) -> Combination:
    """The base combination of `seed`, then (`extend`) what `extended` adds to it, then (`more`, by default as
    `extend`) what `more` adds. `postfix_keeps_refused_transactions`: the Postfix compared with is 3.7.11 or
    earlier (fixed in 3.7.22), so `extended` puts no ETRN right after a message when there is an end_of_data list."""
    rng = random.Random(seed)
    combination = Combination(seed, delay_reject=rng.random() < 0.6, helo_required=rng.random() < 0.2,
                              strict_rfc821=rng.random() < 0.2, unlisted_sender=rng.random() < 0.2,
                              unlisted_recipient=rng.random() < 0.8, unknown_local_code=rng.choice([550, 550, 450]))
    combination.classes["c2"] = items(rng, [])
    combination.classes["c1"] = items(rng, ["c2"])
    # an access value names c1 or c2 whatever the lists do: both are always defined
    for name in rng.sample(LISTS, rng.randint(2, 5)):
        combination.lists[name] = items(rng, ["c1", "c2"], name)
    combination.lists["relay"] = combination.lists.get("relay", []) + ["reject_unauth_destination"]
    combination.sessions = [session(rng) for _ in range(rng.randint(2, 4))]
    if extend:
        extended(combination, postfix_keeps_refused_transactions)
    return more_items(combination) if (extend if more is None else more) else combination


def extended(combination: Combination, postfix_keeps_refused_transactions: bool = True) -> Combination:
    """The stages and items the base draws leave out, from a stream of its own (`random.Random("extended SEED")`):
    an etrn list (check_etrn_access among its items) with ETRN commands in the sessions, in and out of a transaction;
    access tables keyed by address forms (user@, domain, <>) and the items that ask the envelope or the session,
    put in any list or class; BDAT in place of DATA; commands pipelined in one write (what
    reject_unauth_pipelining refuses: after HELO, or before EHLO's reply, or past DATA)."""
    rng = random.Random(f"extended {combination.seed}")
    classes = list(combination.classes)
    if rng.random() < 0.4:
        combination.lists["etrn"] = [etrn_item(rng, classes) for _ in range(rng.randint(1, 4))]
    for _ in range(rng.choice([0, 1, 1, 2])):
        where = rng.choice([*combination.lists, *combination.classes])
        items = combination.lists.get(where) or combination.classes[where]
        position = rng.randint(0, len(items) - (1 if where == "relay" else 0))  # (before the relay guard)
        items.insert(position, extra_item(rng))
    eod = "end_of_data" in combination.lists and postfix_keeps_refused_transactions
    combination.sessions = [extended_session(rng, commands, eod) for commands in combination.sessions]
    return combination


# drawn by `more_items` only (a third stream: the base and extended draws of a seed stay as they were)
MORE_ITEMS = ["permit_inet_interfaces", "check_relay_domains"]
OTHER_NULL_KEY = "nullsender"


def more_items(combination: Combination) -> Combination:
    """From a stream of its own (`random.Random("more SEED")`): permit_inet_interfaces or check_relay_domains put in
    any list or class (in the relay list before its guard), and now and then smtpd_null_access_lookup_key
    `nullsender` with a sender table keyed by it and by `<>` (which is then an ordinary key)."""
    rng = random.Random(f"more {combination.seed}")
    for _ in range(rng.choice([0, 1, 1, 2])):
        where = rng.choice([*combination.lists, *combination.classes])
        items = combination.lists.get(where) or combination.classes[where]
        items.insert(rng.randint(0, len(items) - (1 if where == "relay" else 0)), rng.choice(MORE_ITEMS))
    if rng.random() < 0.3:
        combination.null_key = OTHER_NULL_KEY
        where = rng.choice([*combination.lists, *combination.classes])
        items = combination.lists.get(where) or combination.classes[where]
        entries = {key: rng.choice(ACTIONS) for key in (OTHER_NULL_KEY, "<>")}
        table = "check_sender_access inline:{ " + ", ".join(f"{{{k}={v}}}" for k, v in entries.items()) + " }"
        items.insert(rng.randint(0, len(items) - (1 if where == "relay" else 0)), table)
    return combination


def etrn_item(rng: random.Random, classes: list[str]) -> str:
    roll = rng.random()
    if roll < 0.35:
        entries = {key: rng.choice(ACTIONS) for key in rng.sample(ETRN_KEYS, rng.randint(1, 2))}
        return "check_etrn_access inline:{ " + ", ".join(f"{{{k}={v}}}" for k, v in entries.items()) + " }"
    if roll < 0.45:
        return f"check_client_access {table(rng, 'client')}"
    if roll < 0.55:
        return rng.choice(classes)
    return rng.choice(ETRN_ITEMS)


def extra_item(rng: random.Random) -> str:
    if rng.random() < 0.6:
        kind = rng.choice(list(ADDRESS_KEYS))
        entries = {key: rng.choice(ACTIONS) for key in rng.sample(ADDRESS_KEYS[kind], rng.randint(1, 3))}
        return f"check_{kind}_access inline:{{ " + ", ".join(f"{{{k}={v}}}" for k, v in entries.items()) + " }"
    return rng.choice(EXTRA_ITEMS)


def extended_session(rng: random.Random, commands: list[str], eod: bool) -> list[str]:
    """`commands` with an ETRN, BDAT, a pipelined group or none. With `eod` (an end_of_data list, and a Postfix
    3.7.11 or earlier to compare with) no ETRN right after a message (such a Postfix keeps the transaction after
    that list's refusal, fixed in 3.7.22; mailflow ends it: docs/security.md)."""
    commands = list(commands)
    if rng.random() < 0.35:  # an ETRN anywhere after the XCLIENT, before QUIT
        first = 1 if commands[0].startswith("XCLIENT") else 0
        places = [n for n in range(first, len(commands)) if commands[n] != MESSAGE and  # (not between DATA and it)
                  not (eod and commands[n - 1] == MESSAGE)]
        commands.insert(rng.choice(places), rng.choice(ETRNS))
    if rng.random() < 0.3 and "DATA" in commands:  # the (first) DATA and its message: BDAT
        at = commands.index("DATA")
        commands[at:at + 2] = [BDAT]
    if rng.random() < 0.35:  # a run of 2-4 commands sent at once (not XCLIENT, not past DATA or BDAT)
        starts = [n for n, c in enumerate(commands[:-1]) if not c.startswith(("XCLIENT", "BDAT")) and c != MESSAGE]
        start = rng.choice(starts) if starts else None
        if start is not None:
            end, length = start + 1, rng.randint(2, 4)
            while end < len(commands) - 1 and end - start < length and commands[end - 1] != "DATA" and \
                    commands[end] != MESSAGE and not commands[end].startswith(("XCLIENT", "BDAT")):
                end += 1
            if end - start > 1:
                commands[start:end] = [PIPELINED.join(commands[start:end])]
    return commands
