"""Postfix's key orders and search order over lookup tables (mail_addr_find, maps_find).

    address_search(address, *, delimiter, form, local_domain, at_domain, domains, localpart_at) -> (keys, full)
                                                               the one builder of mail_addr_find's keys:
                                                               user+ext@domain, user@domain, [user+ext, user,]
                                                               [@domain,] [domain keys,] [user+ext@, user@]
    address_keys(address, *, delimiter, local_domain=False, form=EXTERNAL)   its keys for the maps of mail_addr_find
    form: EXTERNAL (Postfix's quoting only: canonical, virtual_alias, generic) or EXTERNAL_FIRST (each key quoted,
          then internal where that differs: every other map Postfix asks with mail_addr_find)
    local_keys(local_part, *, delimiter)                       aliases(5): user+ext, user
    local_part_keys(local, *, delimiter, form)                 the same from a local part as written, in `form`
    split_extension(local, delimiter) -> (user, extension)
    find(tables, keys, full=(0,)) -> (table name, key, value) | None
                                                               every table asked one key before the next key;
                                                               pattern tables (`fixed = False`) only the keys at
                                                               the indices `full` (Postfix's FULL lookups: the
                                                               first key, and for check_client_access the address)
    find_address / find_local (several tables), lookup_address / lookup_local (one table: (key, value) | None)
    mapped_addresses(addr, key, value, *, delimiter, qualify, propagate) -> (str | None, ...)
                                                               what a value found under `key` gives `addr`, as
                                                               Postfix's mail_addr_map makes it: the one place for
                                                               it (canonical, virtual alias and generic maps)

`delimiter` is the configuration's recipient_delimiter, always passed (its default lives in mailflow.config).
`LookupRetry` from a table propagates.
"""
from __future__ import annotations

from typing import Callable, Collection

from mailflow.address import as_internal_local, quoted_local, split, unquoted_local
from mailflow.header_addresses import value_addresses
from mailflow.tables.base import Table


EXTERNAL = "external"  # keys in Postfix's quoting only (mail_addr_map: canonical, virtual_alias, generic maps)
EXTERNAL_FIRST = "external-first"  # each key quoted, then internal where that differs (mail_addr_find's legacy form)


def address_keys(address: str, *, delimiter: str, local_domain: bool = False, form: str = EXTERNAL) -> list[str]:
    """Postfix mail_addr_find order: `user+ext@domain`, `user@domain`, then (only when `local_domain`: the
    domain is one of this host's) `user+ext` and `user`, then `@domain`. An address without '@' gets the
    aliases(5) keys (`local_keys`). See `address_search` for `form`."""
    if "@" not in address:
        return local_keys(address, delimiter=delimiter)
    return address_search(address, delimiter=delimiter, local_domain=local_domain, form=form)[0]


def address_search(address: str, *, delimiter: str, form: str = EXTERNAL, local_domain: bool = False,
                   at_domain: bool = True, domains: Callable[[str], list[str]] | None = None,
                   localpart_at: bool = False) -> tuple[list[str], tuple[int, ...]]:
    """(keys, the indices of the FULL ones) of an address as Postfix's mail_addr_find_opt makes them, the one
    builder of them: `user+ext@domain`, `user@domain`; when `local_domain`, `user+ext`, `user`; `@domain` when
    `at_domain`; then `domains(domain)` (transport(5), access(5): the domain and its parents); when
    `localpart_at`, `user+ext@`, `user@` (access(5)). The extension is split off the internal form and the user
    quoted again (`"a b+x"@d` asks `"a b"@d`). `form` EXTERNAL: every key in Postfix's quoting; EXTERNAL_FIRST:
    each quoted key followed by its internal form where that differs (`"r.1."@d`, `r.1.@d`), both FULL for the
    whole address. An address without '@' (access(5)'s `user`) has only the `localpart_at` keys."""
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    internal = as_internal_local(local)
    quoted = quoted_local(internal) if '"' in local else local  # (a dot-atom is its own quoting: no regex)
    user, ext = split_extension(internal, delimiter)
    quoted_user = ""
    if ext:  # (the user of a dot-atom is one too, unless it ends with the dot before the delimiter)
        quoted_user = user if quoted == internal and not user.endswith(".") else quoted_local(user)
    keys: list[str] = []
    if at:
        keys += _forms(internal, quoted, f"@{domain}", form)
        full = tuple(range(len(keys)))
        if ext:
            keys += _forms(user, quoted_user, f"@{domain}", form)
        if local_domain:
            keys += _forms(internal, quoted, "", form)
            if ext:
                keys += _forms(user, quoted_user, "", form)
        if at_domain:
            keys.append(f"@{domain}")
        if domains is not None:
            keys += domains(domain)
    else:
        full = (0,)
    if localpart_at:
        keys += _forms(internal, quoted, "@", form)
        if ext:
            keys += _forms(user, quoted_user, "@", form)
    return keys, full


def local_part_keys(local: str, *, delimiter: str, form: str = EXTERNAL) -> list[str]:
    """aliases(5) keys of a local part (as an address writes it): `user+ext`, then `user`, the extension split off
    the internal form, each in Postfix's quoting and (EXTERNAL_FIRST) then in internal form where that differs
    (`"al.1."`, `al.1.`), as local(8)'s alias lookup asks them."""
    internal = as_internal_local(local)
    keys = []
    for name in local_keys(internal, delimiter=delimiter):
        keys += _forms(name, quoted_local(name), "", form)
    return keys


def _forms(internal: str, quoted: str, suffix: str, form: str) -> list[str]:
    """One key in Postfix's quoting, then (EXTERNAL_FIRST) in internal form if that differs."""
    if form == EXTERNAL or quoted == internal:
        return [quoted + suffix]
    return [quoted + suffix, internal + suffix]


def local_keys(local_part: str, *, delimiter: str) -> list[str]:
    """aliases(5) order: `user+ext`, then `user`."""
    user, ext = split_extension(local_part, delimiter)
    return [local_part, user] if ext else [local_part]


def find(tables: list[Table], keys: list[str], full: Collection[int] = (0,)) -> tuple[str, str, str] | None:
    """(table name, key, value) for the first key any table answers: every table is asked one key before the
    next key is tried (Postfix maps_find). Pattern tables (`fixed = False`) are asked only the keys whose
    indices are in `full` (Postfix's FULL as against PARTIAL lookups; the first key unless told).
    LookupRetry propagates."""
    for i, key in enumerate(keys):
        for table in tables:
            if i not in full and not table.fixed:
                continue
            value = table.lookup(key)
            if value is not None:
                return table.name, key, value
    return None


def find_address(tables: list[Table], address: str, *, delimiter: str, local_domain: bool = False,
                 form: str = EXTERNAL) -> tuple[str, str, str] | None:
    if "@" not in address:
        return find(tables, local_keys(address, delimiter=delimiter))
    return find(tables, *address_search(address, delimiter=delimiter, local_domain=local_domain, form=form))


def find_local(tables: list[Table], local_part: str, *, delimiter: str) -> tuple[str, str, str] | None:
    return find(tables, local_keys(local_part, delimiter=delimiter))


def lookup_address(table: Table, address: str, *, delimiter: str,
                   local_domain: bool = False) -> tuple[str, str] | None:
    """`find_address` in one table: (key, value) or None."""
    found = find_address([table], address, delimiter=delimiter, local_domain=local_domain)
    return found[1:] if found else None


def lookup_local(table: Table, local_part: str, *, delimiter: str) -> tuple[str, str] | None:
    """`find_local` in one table: (key, value) or None."""
    found = find_local([table], local_part, delimiter=delimiter)
    return found[1:] if found else None


def split_extension(local: str, delimiter: str) -> tuple[str, str]:
    """'user+ext' -> ('user', '+ext'), splitting at the first of any delimiter character; never leaves an
    empty user ('+ext' stays whole). An empty delimiter means no extensions."""
    if not delimiter:
        return local, ""
    for i, c in enumerate(local):
        if c in delimiter:
            return (local[:i], local[i:]) if i else (local, "")
    return local, ""


def mapped_addresses(addr: str, key: str, value: str, *, delimiter: str, qualify: Callable[[str], str],
                     propagate: bool) -> tuple[str | None, ...]:
    """The addresses a table's `value` (found under `key`) gives `addr`, as Postfix's mail_addr_map makes them;
    None for a mailbox that is no address (each caller has its policy for those, and for a value of none).
    - An empty value or `<>` is the null address `""` (Postfix's workaround for it).
    - A value that starts with `@` gets the address's local part put in front of it, the whole value: the local
      part unquoted, the value after it, then all before the last '@' quoted once (`@x, b@y` gives
      `"user@x, b"@y`); an extension the key did not match is left out of that local part.
    - An extension the key matched without (`user@domain` or `user` key, not `@domain`) is carried onto every
      address when `propagate` (propagate_unmatched_extensions: canonical and virtual, not generic), inside the
      quotes of a quoted local part, as mail_addr_crunch puts it.
    - A later `@domain` of a list is an address with an empty local part (`""@domain`, with that extension).
    - Every other address goes through `qualify` (`user` -> `user@myorigin`)."""
    if value.strip() in ("", "<>"):
        return ("",)
    local = _plain_local(split(addr)[0])
    ext = split_extension(local, delimiter)[1]
    key_local = _plain_local(split(key)[0] if "@" in key else key)
    unmatched = ext if ext and key_local and key_local.lower() != local.lower() else ""
    items = value_addresses(value)  # (cached: a value met for many addresses is parsed once)
    if value.startswith("@"):
        one_domain = items == (value.strip(),)  # `@domain` alone: its result is the one address, not parsed again
        before_at, _, domain = (local.removesuffix(unmatched) + value.strip()).rpartition("@")
        value = f"{quoted_local(before_at)}@{domain}"
        items = (value,) if one_domain else value_addresses(value)
    carried = unmatched if propagate else ""
    return tuple(None if item is None else _with_extension(item, carried, qualify) for item in items)


def _with_extension(item: str, unmatched: str, qualify: Callable[[str], str]) -> str:
    """One address of a mapped value, qualified, with the extension its key did not match."""
    if item.startswith("@"):
        return f'"{unmatched}"{item}'
    result = qualify(item)
    if unmatched and result:
        result_local, result_domain = split(result)
        result = f"{quoted_local(_plain_local(result_local) + unmatched)}@{result_domain}"
    return result


def _plain_local(local: str) -> str:
    """A local part as Postfix's internal form holds it: a quoted one without its quotes."""
    bare = unquoted_local(local)
    return local if bare is None else bare
