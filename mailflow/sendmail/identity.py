"""Who is submitting, and what the configuration lets them do (Postfix authorized_submit_users,
local_login_sender_maps).

    current_identity() -> Identity                    the process's uid, login name and GECOS full name
    identity_of(uid) -> Identity                      the same for any uid (its passwd entry; "uid<N>" when none)
    passwd_identity(uid) -> Identity | None           its passwd entry; None when none is given (no entry, or
                                                      NSS cannot answer: pwd cannot tell them apart)
    gecos_full_name(gecos, login) -> str              the full name in a GECOS field, as Postfix's fullname() reads
                                                      it: up to the first ',', ';' or '%', each '&' the login
                                                      name capitalized
    may_submit(login, items) -> bool                  authorized_submit_users: the first item that matches decides
    may_use_sender(login, sender, config) -> bool     login@myorigin always; else the first table that knows the
                                                      login decides (patterns: "*", "<>", "@domain", an address,
                                                      a bare local part qualified with myorigin)
    submit_problem(login, sender, config) -> str      both checks as pickup applies them to a maildrop file of
                                                      another user (what sendmail checked before writing it):
                                                      why not ("" when it may)

Failure behaviour: a table that cannot answer raises LookupRetry (sendmail exits 75).
"""
from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass

from mailflow.sendmail.settings import Settings
from mailflow.tables import open_table


@dataclass(frozen=True)
class Identity:
    uid: int
    login: str
    gecos: str


def current_identity() -> Identity:
    return identity_of(os.getuid())


def identity_of(uid: int) -> Identity:
    return passwd_identity(uid) or Identity(uid, f"uid{uid}", "")  # (no entry, containers: named by its number)


def passwd_identity(uid: int) -> Identity | None:
    """`uid`'s passwd entry; None when the passwd database does not give one (none, or NSS cannot answer: the
    same KeyError)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return None
    return Identity(uid, entry.pw_name, gecos_full_name(entry.pw_gecos, entry.pw_name))


def gecos_full_name(gecos: str, login: str) -> str:
    """The full name in a GECOS field as Postfix's fullname() takes it: up to the first ',', ';' or '%', and each
    '&' is the login name with its first letter capitalized (`&,Room 4` for login `bob` is `Bob`)."""
    name = re.split("[,;%]", gecos, maxsplit=1)[0]
    return name.replace("&", login[:1].upper() + login[1:]).strip()


def may_submit(login: str, items: tuple[str, ...]) -> bool:
    """authorized_submit_users: the first item that matches `login` decides; no match means no."""
    for item in items:
        if ":" in item:
            if open_table(item).lookup(login) is not None:
                return True
        elif item.startswith("!") and item[1:] == login:
            return False
        elif item == login:
            return True
    return False


def may_use_sender(login: str, sender: str, config: Settings) -> bool:
    """local_login_sender_maps: login@myorigin always; else the first table that knows `login` decides."""
    origin = config.origin
    if sender.lower() in (login.lower(), f"{login}@{origin}".lower()):
        return True
    for spec in config.sendmail.local_login_sender_maps:
        value = open_table(spec).lookup(login)
        if value is not None:
            return any(_sender_matches(p, sender, origin) for p in re.split(r"[\s,]+", value.strip()) if p)
    return False


def submit_problem(login: str, sender: str, config: Settings) -> str:
    """Why `login` may not submit mail from `sender` ("" when it may): authorized_submit_users, then
    local_login_sender_maps (as sendmail checks them)."""
    if not may_submit(login, config.sendmail.authorized_submit_users):
        return "not allowed to submit mail (authorized_submit_users)"
    if not may_use_sender(login, sender, config):
        return f"may not use the sender address <{sender}> (local_login_sender_maps)"
    return ""


def _sender_matches(pattern: str, sender: str, origin: str) -> bool:
    if pattern == "*":
        return True
    if pattern == "<>":
        return sender == ""
    if not sender:
        return False
    if pattern.startswith("@"):
        return sender.lower().endswith(pattern.lower())
    wanted = pattern if "@" in pattern else f"{pattern}@{origin}"
    return sender.lower() == wanted.lower()
