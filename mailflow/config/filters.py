"""The inbound filters' sections (docs/filtering.md), every one off by default.

    ChecksConfig      [checks]        cleanup's content inspection: header_checks, mime_header_checks,
                                      nested_header_checks, body_checks (regexp or pcre tables), body_checks_size_limit
    MilterConfig      [milter]        the Milter client: milter_default_action, milter_protocol, the timeouts,
                                      non_smtpd_milters (smtpd's milters are the per-listener `[smtpd] milters`)
    SpamdConfig       [spamd]         SpamAssassin's spamd: address, timeout, size limit, action, on_failure
    ClamdConfig       [clamd]         ClamAV's clamd (INSTREAM): address, timeout, size limit, action, on_failure
    GreylistConfig    [greylist]      check_greylist: delay, lifetimes, whitelists, auto-whitelist, its database
    AddressVerifyConfig [address_verify]  reject_unverified_recipient/_sender: probes, cache lifetimes and sizes
    SenderAuthConfig  [sender_auth]   SPF, DKIM and DMARC verdicts and the Authentication-Results header
    SmtpdFilterSettings               [smtpd] settings a listener may override (SmtpdConfig inherits them):
                                      milters, content_filter (the after-queue filter), receive_override_options
    RECEIVE_OVERRIDE_OPTIONS, MILTER_ENDPOINT_KINDS

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mailflow.config.base import (Duration, Networks, PostfixInt, Relayhost, Section, TableSpecs, TransportOverride,
                                  each_one_of)
from mailflow.syntax import parse_endpoint, parse_hostport

RECEIVE_OVERRIDE_OPTIONS = ("no_unknown_recipient_checks", "no_address_mappings", "no_header_body_checks",
                            "no_milters")
MILTER_ENDPOINT_KINDS = ("inet", "unix")


def check_transport_nexthop(value: str) -> str:
    """`transport:nexthop` (Postfix content_filter / FILTER): a transport name, then an optional next hop."""
    transport, colon, _ = value.partition(":")
    if not colon or not transport.strip() or not transport.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"{value!r} is not transport:nexthop (e.g. smtp:[127.0.0.1]:10024)")
    return value


def check_milter(spec: str) -> str:
    """A milter as Postfix names one: `inet:host:port` or `unix:/path`."""
    try:
        parse_endpoint(spec)
    except ValueError:
        raise ValueError(f"{spec!r} is not a milter (inet:host:port or unix:/path)") from None
    return spec


class SmtpdFilterSettings(Section):
    """The filter settings one listener may set for itself (`[[smtpd.listeners]] overrides`), as master.cf -o:
    the return listener of an after-queue filter sets `content_filter = ""` and
    `receive_override_options = ["no_header_body_checks", "no_milters", "no_unknown_recipient_checks"]`."""

    # smtpd_milters: inet:host:port or unix:/path, asked in order at every SMTP event.
    milters: tuple[str, ...] = ()
    # The after-queue filter (Postfix content_filter), "transport:nexthop" (e.g. "smtp:[127.0.0.1]:10024"):
    # every message queued goes there instead of its recipients' routes; "" none. [smtpd]'s value also serves
    # mail submitted with `mailflow sendmail` (pickup), as Postfix's main.cf content_filter does.
    content_filter: str = ""
    # What a listener skips (Postfix receive_override_options); [smtpd]'s value also serves pickup, as Postfix's
    # main.cf value does (an after-queue filter's front side: no_address_mappings, docs/filtering.md).
    receive_override_options: tuple[str, ...] = ()

    @field_validator("milters")
    @classmethod
    def _milters(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_milter(m) for m in v)

    @field_validator("content_filter")
    @classmethod
    def _content_filter(cls, v: str) -> str:
        return check_transport_nexthop(v) if v else v

    @field_validator("receive_override_options")
    @classmethod
    def _overrides(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return each_one_of(v, RECEIVE_OVERRIDE_OPTIONS)


class ChecksConfig(Section):
    """cleanup's content inspection (Postfix header_checks(5)): regexp or pcre tables whose values are
    actions."""

    header_checks: TableSpecs = ()
    mime_header_checks: TableSpecs = ()  # MIME headers of the message and of its parts (else header_checks)
    nested_header_checks: TableSpecs = ()  # headers of attached messages (message/rfc822 parts)
    body_checks: TableSpecs = ()
    # Only this many bytes of each body part are given to body_checks (0: none).
    body_checks_size_limit: PostfixInt = Field(51200, ge=0)


class MilterConfig(Section):
    """The Milter client (Postfix milter_*). A milter that cannot be reached, times out or breaks the protocol
    gets `default_action`: tempfail (451 4.7.1 for the client), accept (skip that milter), reject (550 5.5.0)
    or quarantine (accept and hold)."""

    default_action: Literal["tempfail", "accept", "reject", "quarantine"] = "tempfail"
    protocol: int = Field(6, ge=2, le=6)
    connect_timeout: Duration = Field(30.0, gt=0)
    command_timeout: Duration = Field(30.0, gt=0)
    content_timeout: Duration = Field(300.0, gt=0)
    # Milters for mail that does not come in through smtpd (sendmail / pickup): mailflow.filters.milter.message.
    non_smtpd_milters: tuple[str, ...] = ()

    @field_validator("non_smtpd_milters")
    @classmethod
    def _milters(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_milter(m) for m in v)


class _ScannerConfig(Section):
    address: str = ""  # "" off; "host:port" or "unix:/path"
    timeout: Duration = Field(30.0, gt=0)
    # "accept" (fail open: the message goes on unscanned, logged) or "tempfail" (fail closed: 451 4.7.1)
    on_failure: Literal["accept", "tempfail"] = "accept"

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        """Where the scanner listens: port 0 is none (a milter's or a policy service's is refused alike)."""
        if v and not v.startswith("unix:/") and not parse_hostport(v)[1]:
            raise ValueError(f"{v!r}: port 0 is no port to connect to")
        return v


class SpamdConfig(_ScannerConfig):
    """SpamAssassin's spamd (SYMBOLS): spam is tagged (X-Spam-Flag, X-Spam-Status with the score and the rules),
    held or refused (550 5.7.1); messages over `size_limit` are not scanned (spamc's 500 KB)."""

    size_limit: int = Field(512_000, ge=1)
    action: Literal["tag", "hold", "reject"] = "tag"
    # Refuse instead at this score or more, whatever `action` says (0: never).
    reject_score: float = Field(0.0, ge=0)


class ClamdConfig(_ScannerConfig):
    """ClamAV's clamd (INSTREAM): a virus is refused (554 5.7.1), held or tagged (X-Virus-Status);
    fail-closed by default; messages over `size_limit` (clamd's StreamMaxLength) are not scanned."""

    size_limit: int = Field(25 * 1024 * 1024, ge=1)
    action: Literal["tag", "hold", "reject"] = "reject"
    on_failure: Literal["accept", "tempfail"] = "tempfail"


class GreylistConfig(Section):
    """check_greylist (a restriction): a new (client network, sender, recipient) triplet is deferred (450 4.2.0)
    until `delay` has passed; a retry within `retry_window` after that passes, and a passed triplet stays known
    for `lifetime`. A client that passed `auto_whitelist_count` times is no longer greylisted."""

    database_file: str = ""  # "" is <queue_directory>/greylist.db
    delay: Duration = 300.0
    retry_window: Duration = Field(2 * 86400.0, gt=0)
    lifetime: Duration = Field(35 * 86400.0, gt=0)
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    whitelist_networks: Networks = ()
    whitelist_domains: tuple[str, ...] = ()  # sender domains (and their subdomains) never greylisted
    auto_whitelist_count: int = Field(5, ge=0)  # 0: no auto-whitelist


PROBE_ROUTING = ("relayhost", "transport_maps", "local_transport", "virtual_transport", "relay_transport",
                 "default_transport", "sender_dependent_relayhost_maps",
                 "sender_dependent_default_transport_maps")  # [address_verify]'s overrides of the main settings


class AddressVerifyConfig(Section):
    """Address verification (Postfix verify(8), ADDRESS_VERIFICATION_README), for reject_unverified_recipient
    and reject_unverified_sender: a probe (MAIL FROM:<sender>, RCPT TO, no DATA) along the address's route; the
    results cached in memory, at most `cache_size` addresses (least recently used dropped), at most
    `probe_limit` probes at once. smtpd waits for a new probe up to poll_delay x (poll_count - 1).
    The PROBE_ROUTING settings (Postfix's address_verify_relayhost, _transport_maps, _local_transport, ...)
    route the probes in place of the main settings of the same names; empty: the main one."""

    sender: str = "double-bounce"  # address_verify_sender: qualified with myorigin; "<>": the null sender
    # address_verify_sender_ttl: 0, a fixed sender; else the sender's local part gets a stamp that changes every
    # sender_ttl (double-bounce1C3F5@…), and smtpd takes the stamps of the last, this and the next period
    sender_ttl: Duration = Field(0.0, ge=0)
    relayhost: Relayhost = ""
    transport_maps: TableSpecs = ()
    local_transport: TransportOverride = ""
    virtual_transport: TransportOverride = ""
    relay_transport: TransportOverride = ""
    default_transport: TransportOverride = ""
    # asked with the probe's sender, as mail is with its own (address_verify_sender_dependent_*_maps)
    sender_dependent_relayhost_maps: TableSpecs = ()
    sender_dependent_default_transport_maps: TableSpecs = ()
    poll_count: PostfixInt = Field(3, ge=1)
    poll_delay: Duration = Field(3.0, gt=0)
    positive_expire_time: Duration = Field(31 * 86400.0, gt=0)
    positive_refresh_time: Duration = Field(7 * 86400.0, gt=0)
    negative_cache: bool = True
    negative_expire_time: Duration = Field(3 * 86400.0, gt=0)
    negative_refresh_time: Duration = Field(3 * 3600.0, gt=0)
    cache_size: int = Field(100_000, ge=1)
    probe_limit: int = Field(20, ge=1)

    @field_validator("sender")
    @classmethod
    def _sender(cls, v: str) -> str:
        """Postfix refuses a sender beginning or ending with '@' (make_verify_sender_addr)."""
        if v.strip().startswith("@") or v.strip().endswith("@"):
            raise ValueError(f"{v!r} must not begin or end with '@' (\"<>\" is the null sender)")
        return v


class SenderAuthConfig(Section):
    """SPF, DKIM and DMARC verdicts of mail received by smtpd, written by cleanup as one
    Authentication-Results header; restrictions reject_spf_fail and reject_dmarc_policy act on them."""

    verify: tuple[Literal["spf", "dkim", "dmarc"], ...] = ()  # () off; DMARC needs SPF and DKIM
    authserv_id: str = ""  # "" is myhostname
    timeout: Duration = Field(10.0, gt=0)  # for all the lookups of one message
