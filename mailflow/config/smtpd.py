"""`[smtpd]`: the SMTP server (Postfix smtpd) and its listeners (`[[smtpd.listeners]]`, like master.cf lines).

    SmtpdConfig                   every smtpd setting; `for_listener(listener)` gives one listener's effective
                                  settings (these, then its role's presets, then its `overrides`); `ports`
                                  the listeners' TCP ports
    PostscreenConfig              `[smtpd.postscreen]`: Postfix's postscreen(8) before an mta listener's smtpd
    ListenerConfig                one listener: address, role (mta, submission, submissions), overrides
    LISTENER_ROLES                what each role presets

Failure behaviour: a bad value, an unknown override, a listener whose TLS/AUTH settings cannot work, or
restriction lists that could not refuse relaying raise ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mailflow.config.base import (Duration, FrozenMap, HostPorts, InlineTableSpecs, Networks, PostfixInt, Restriction,
                                  RestrictionClasses, Section, TableSpecs, overlay, validation_key,
                                  validation_reason)
from mailflow.config.filters import SmtpdFilterSettings
from mailflow.dnsbl_sites import parse_dnsbl_site
from mailflow.tables import check_spec
from mailflow.ehlo_keywords import discard_set
from mailflow.rbl_reply import DEFAULT_RBL_REPLY, check_rbl_template
from mailflow.reply_footer import POSTSCREEN_FOOTER_MACROS, check_footer
from mailflow.restriction_vocabulary import (ALL_PERMITS, LOGGED_PERMITS, PERMIT_VALUES_TEXT, GUARDED,
                                             PERMITTED, RELAY_GUARDS, Found, check_item, relay_guard)
from mailflow.syntax import parse_endpoint, parse_hostport


# smtpd_tls_fingerprint_digest: the digests OpenSSL and hashlib share that make a fixed-length fingerprint
FINGERPRINT_DIGESTS = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512")

# Front door: what a listener role presets before its own overrides (master.cf `-o`); see ListenerConfig.
LISTENER_ROLES: dict[str, dict[str, object]] = {
    "mta": {},
    "submission": {"tls_security_level": "encrypt", "sasl_auth_enable": True, "sasl_auth_required": True,
                   "postscreen": {"enable": False}},
    "submissions": {"sasl_auth_enable": True, "sasl_auth_required": True, "postscreen": {"enable": False}},
}
MERGED_TABLES = ("postscreen",)  # settings a preset or an override changes key by key, not as a whole
SECTION_ONLY = ("listen", "listeners")  # [smtpd] settings that are the listeners themselves: no listener overrides them


SMTPD_BANNER = "$smtpd_banner"  # postscreen_greet_banner's default, as Postfix writes it: smtpd's own text
ScreenAction = Literal["ignore", "enforce", "drop"]
ACCESS_ACTIONS = ("permit", "reject", "dunno")  # what a postscreen_access_list table may answer


class PostscreenConfig(Section):
    """`[smtpd.postscreen]` (a listener's `overrides.postscreen` changes it key by key; submission and submissions
    listeners preset `enable = false`): Postfix's postscreen(8) in front of an mta listener's smtpd
    (docs/security.md, "postscreen"). Names are postscreen_* without the prefix."""

    enable: bool = False
    # permit_mynetworks, and cidr:/regexp:/texthash: tables answering permit, reject or dunno, first answer wins
    access_list: tuple[str, ...] = ("permit_mynetworks",)
    denylist_action: ScreenAction = "ignore"  # postscreen_denylist_action (blacklist_action before Postfix 3.6)
    greet_wait: Duration = Field(6.0, gt=0)
    greet_banner: str = SMTPD_BANNER  # the `220-` teaser: SMTPD_BANNER (smtpd's greeting's text), "": none
    greet_action: ScreenAction = "ignore"
    greet_ttl: Duration = Field(86400.0, gt=0)
    dnsbl_sites: tuple[str, ...] = ()  # domain[=filter][*weight]
    dnsbl_threshold: PostfixInt = Field(1, ge=1)
    dnsbl_allowlist_threshold: int = Field(0, le=0)  # a score at or below it (when < 0) allowlists the client
    dnsbl_action: ScreenAction = "ignore"
    dnsbl_timeout: Duration = Field(10.0, gt=0)
    dnsbl_min_ttl: Duration = Field(60.0, gt=0)
    dnsbl_max_ttl: Duration = Field(3600.0, gt=0)
    # the cache of clients that passed (postscreen_cache_map; in memory, the oldest dropped beyond this many)
    cache_limit: int = Field(100_000, ge=1)
    # clients being screened at once per listener (postscreen_pre_queue_limit); beyond: 421 4.3.2
    pre_queue_limit: PostfixInt = Field(100, ge=10)
    # one client's connections in the screen at once (postscreen_client_connection_count_limit; 0: none); unset:
    # smtpd's client_connection_count_limit, as Postfix's default
    client_connection_count_limit: PostfixInt | None = Field(None, ge=0)
    # the dummy engine's commands per session (postscreen_command_count_limit; QUIT always answered); at most 1000
    # here, which bounds what a client that never reads its replies leaves in the write buffer
    command_count_limit: int = Field(20, ge=1, le=1000)
    # how long the dummy engine waits for a command (postscreen_command_time_limit); unset: smtpd's timeout, as
    # Postfix's default. In stress mode (pre_queue_limit 90 % taken, until it is back to 70 %; Postfix's
    # `${stress?...}` values) the stress_ ones apply to the commands and to the greet wait of new clients
    command_time_limit: Duration | None = Field(None, gt=0)
    stress_command_time_limit: Duration = Field(10.0, gt=0)
    stress_greet_wait: Duration = Field(2.0, gt=0)  # postscreen_greet_wait's: min 1s
    # the deep protocol tests (after the 220, in the dummy engine; a client that passes is told 450 at its RCPT and
    # goes to smtpd when it comes back): pipelining (a command sent before the reply to the one before),
    # non_smtp_command (a forbidden_commands word, or a header-like or non-letter command), bare_newline (a line
    # ended by LF alone); each with its action and how long its pass is remembered
    pipelining_enable: bool = False
    pipelining_action: ScreenAction = "enforce"
    pipelining_ttl: Duration = Field(30 * 86400.0, gt=0)
    non_smtp_command_enable: bool = False
    non_smtp_command_action: ScreenAction = "drop"
    non_smtp_command_ttl: Duration = Field(30 * 86400.0, gt=0)
    bare_newline_enable: bool = False
    bare_newline_action: ScreenAction = "ignore"
    bare_newline_ttl: Duration = Field(30 * 86400.0, gt=0)
    # the non_smtp_command test's words (postscreen_forbidden_commands); unset: smtpd's forbid_cmds, as Postfix's
    # default $smtpd_forbidden_commands
    forbidden_commands: tuple[str, ...] | None = None
    # the DNSBL name a refusal shows: a table from a postscreen_dnsbl_sites domain to the text (""; the domain)
    dnsbl_reply_map: str = ""
    # the listener addresses where a client can earn a cache entry (postscreen_allowlist_interfaces); elsewhere
    # (a backup MX address) it is never handed to smtpd: `ALLOWLIST VETO`, then the dummy engine
    allowlist_interfaces: Networks = ("static:all",)
    # STARTTLS in the dummy engine (postscreen_tls_security_level; unset: smtpd's tls_security_level, as Postfix's
    # default), with smtpd's certificate (none: not offered; encrypt needs it): may offers it, encrypt also answers
    # HELO, EHLO, STARTTLS, NOOP and QUIT `530 5.7.0` before it; the deep tests go on over TLS
    tls_security_level: Literal["none", "may", "encrypt"] | None = None
    # the EHLO keywords the dummy engine leaves out (postscreen_discard_ehlo_keywords and
    # postscreen_discard_ehlo_keyword_address_maps; unset: smtpd's): after an EHLO STARTTLS is 502, BDAT 502 and the
    # end
    discard_ehlo_keywords: tuple[str, ...] | None = None
    discard_ehlo_keyword_address_maps: TableSpecs | None = None
    # each command line rewritten by a table before the dummy engine reads it (postscreen_command_filter; not
    # smtpd's by default: Postfix 3.7's default is empty)
    command_filter: TableSpecs = ()
    # a text under each 4xx and 5xx reply of postscreen (postscreen_reject_footer; unset: smtpd's reject_footer);
    # its macros are postscreen's: $server_name, $client_address, $client_port, $localtime (smtpd's others, in
    # smtpd's footer, expand to nothing, as in Postfix)
    reject_footer: str | None = None
    # footers by reply (postscreen_reject_footer_maps): tables looked up with the whole reply (`550 5.3.2 Service
    # currently unavailable`, before soft_bounce), the first that has it giving the footer in reject_footer's place;
    # tables that answer without waiting only (a reply is written on the event loop)
    reject_footer_maps: InlineTableSpecs = ()
    # the characters a footer macro's value keeps, the others made `_` (postscreen_expansion_filter, as main.cf
    # writes it: `\t`, `\40` for a space, `\\` for a backslash; unset: Postfix's default, a tab and printable
    # ASCII)
    expansion_filter: str | None = None

    @field_validator("discard_ehlo_keywords")
    @classmethod
    def _discard_ehlo_keywords(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(sorted(discard_set(v)))

    @field_validator("reject_footer")
    @classmethod
    def _reject_footer(cls, v: str | None) -> str | None:
        return None if v is None else check_footer(v, POSTSCREEN_FOOTER_MACROS)

    @field_validator("dnsbl_reply_map")
    @classmethod
    def _reply_map(cls, v: str) -> str:
        if v:
            check_spec(v)
        return v

    @field_validator("dnsbl_sites")
    @classmethod
    def _sites(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            parse_dnsbl_site(entry)
        return v

    @field_validator("access_list")
    @classmethod
    def _access(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if item != "permit_mynetworks":
                check_spec(item)
        return v


class ListenerConfig(Section):
    """One `[[smtpd.listeners]]` table, like one smtpd line of master.cf: `role` mta (port 25 style), submission
    (587: STARTTLS before AUTH, AUTH before MAIL) or submissions (465: implicit TLS, AUTH before MAIL);
    `overrides` replace [smtpd] settings for this listener only, on top of the role's presets."""

    address: str
    role: Literal["mta", "submission", "submissions"] = "mta"
    overrides: dict[str, object] = {}

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_hostport(v)
        return v


def _unguarded_reason(key: str, found: Found) -> str:
    """Where a list that cannot refuse relaying goes wrong: `relay_restrictions[1] c1 -> c1[0] permit` first, a
    guard only under warn_if_reject, or no guard at all."""
    if found.result == PERMITTED:
        return f"{key} reaches a permit first: {found.where()}"
    if found.warned_guard:
        return f"{key}: {found.guard} under warn_if_reject only warns: {found.where()}"
    return f"{key} reaches none"


class SmtpdConfig(SmtpdFilterSettings):
    """The SMTP server (Postfix smtpd); its filter settings (milters, content_filter, receive_override_options)
    are declared in filters.py."""

    listen: HostPorts = ("127.0.0.1:2525",)
    banner: str = "ESMTP mailflow"
    # Name each client at connect, as Postfix's smtpd_peername_lookup: its address's name in /etc/hosts or its
    # forward-confirmed PTR name, else "unknown" (logs, Received, check_client_access, the policy service).
    peername_lookup: bool = True
    message_size_limit: int = Field(10_240_000, ge=0)
    recipient_limit: PostfixInt = Field(1000, ge=1)
    # 452 answers past recipient_limit count as errors only beyond this many (smtpd_recipient_overshoot_limit).
    recipient_overshoot_limit: PostfixInt = Field(1000, ge=1)
    timeout: Duration = Field(300.0, gt=0)
    max_line_length: PostfixInt = Field(2048, ge=512)
    # Front door (docs/security.md): listeners with roles, TLS, AUTH, connection limits.
    # `listen` addresses are mta listeners; `listeners` add listeners with a role and per-listener overrides.
    listeners: tuple[ListenerConfig, ...] = ()
    postscreen: PostscreenConfig = PostscreenConfig()
    # TLS (smtpd_tls_cert_file/key_file; "" key: the key is in the cert file); "may" offers STARTTLS when a
    # certificate is configured, "encrypt" requires it before any mail command (smtpd_tls_security_level).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_security_level: Literal["none", "may", "encrypt"] = "may"
    # The TLS handshake (after STARTTLS, or first on a submissions listener) must end within this, whatever
    # `timeout` is (smtpd_starttls_timeout); past it the connection is closed without a word.
    starttls_timeout: Duration = Field(300.0, gt=0)
    # What is logged of each TLS session (smtpd_tls_loglevel): 0 its failures only (`SSL_accept error from ...`),
    # 1 and above also the summary line (`Anonymous TLS connection established from ...`); nothing more from 2 on.
    tls_loglevel: int = Field(0, ge=0, le=4)
    # Client certificates (docs/security.md, "Client certificates"): ask each TLS client for one
    # (smtpd_tls_ask_ccert), verified against tls_ca_file (smtpd_tls_CAfile: the CAs, or the certificates
    # themselves, that vouch for them; needed with tls_ask_ccert: Python's ssl ends the handshake of a certificate it
    # cannot verify, where Postfix goes on without trusting it). Fingerprints (tls_fingerprint_digest,
    # smtpd_tls_fingerprint_digest: sha256 as Postfix 3.6+) are upper-case hex pairs joined by ':', of the
    # certificate and of its public key; relay_clientcerts lists the ones permit_tls_clientcerts lets relay.
    tls_ask_ccert: bool = False
    tls_ca_file: str = ""
    tls_fingerprint_digest: str = "sha256"
    relay_clientcerts: TableSpecs = ()
    # AUTH PLAIN/LOGIN over TLS (smtpd_sasl_auth_enable) against sasl_user_maps (`user scrypt-hash`, made by
    # `mailflow auth hash-password`); sasl_auth_required: MAIL needs AUTH (530 5.7.0).
    sasl_auth_enable: bool = False
    sasl_auth_required: bool = False
    sasl_user_maps: TableSpecs = ()
    # Who checks AUTH passwords (smtpd_sasl_type): "mailflow" (sasl_user_maps) or "dovecot": Dovecot's auth
    # server at sasl_path (smtpd_sasl_path: a unix socket path, or inet:host:port), which must answer within
    # sasl_timeout (Postfix: 10s, fixed); a Dovecot that is down or silent gets 454 4.7.0.
    sasl_type: Literal["mailflow", "dovecot"] = "mailflow"
    sasl_path: str = ""
    sasl_timeout: Duration = Field(10.0, gt=0)
    allow_plaintext_auth_on_loopback: bool = False
    # The Received header names the AUTH login, `(Authenticated sender: LOGIN)` (smtpd_sasl_authenticated_header).
    sasl_authenticated_header: bool = False
    # Clients AUTH is not offered to in the EHLO reply (smtpd_sasl_exceptions_networks: a network list, as
    # mynetworks); they may still use it, as in Postfix.
    sasl_exceptions_networks: Networks = ()
    # smtpd_sender_login_maps (sender -> logins owning it) and reject_sender_login_mismatch (553 5.7.1).
    sender_login_maps: TableSpecs = ()
    reject_sender_login_mismatch: bool = False
    # A failed AUTH is answered after a delay doubling per recent failure of the client, up to the limit.
    auth_failure_delay: Duration = 1.0
    auth_failure_delay_limit: Duration = 16.0
    # anvil: sessions at once and new sessions per anvil_rate_time_unit per client IP (0: no limit; mynetworks
    # exempt), and sessions at once per listener (more wait for a slot; beyond twice as many: 421 4.3.2).
    client_connection_count_limit: PostfixInt = Field(50, ge=0)
    client_connection_rate_limit: PostfixInt = Field(0, ge=0)
    # and per anvil_rate_time_unit per client IP: MAIL commands, RCPT (and VRFY) commands, AUTH commands (0: no
    # limit; beyond: 450 4.7.1), TLS handshakes that resume no session (beyond: 421 4.7.0, then STARTTLS 454 4.7.0)
    client_message_rate_limit: PostfixInt = Field(0, ge=0)
    client_recipient_rate_limit: PostfixInt = Field(0, ge=0)
    client_auth_rate_limit: PostfixInt = Field(0, ge=0)
    client_new_tls_session_rate_limit: PostfixInt = Field(0, ge=0)
    anvil_rate_time_unit: Duration = Field(60.0, gt=0)
    max_sessions: PostfixInt = Field(100, ge=1)
    # Protocol (docs/security.md): bare LF/CR refused with 521 and a disconnect
    # (smtpd_forbid_bare_newline = reject); input before the greeting or pipelined where RFC 2920 forbids it
    # refused with 554 and a disconnect (smtpd_forbid_unauth_pipelining); DATA must keep min_data_rate bytes/s
    # beyond `timeout` (smtpd_min_data_rate); error tarpit and limit; junk commands; VRFY.
    forbid_bare_newline: bool = True
    # The clients forbid_bare_newline spares: their bare LF ends a line, as with forbid_bare_newline = false
    # (smtpd_forbid_bare_newline_exclusions; unset: mynetworks, as Postfix's default $mynetworks; [] spares none).
    forbid_bare_newline_exclusions: Networks | None = None
    forbid_unauth_pipelining: bool = True
    min_data_rate: PostfixInt = Field(500, ge=1)
    soft_error_limit: PostfixInt = Field(10, ge=1)
    hard_error_limit: PostfixInt = Field(20, ge=1)
    error_sleep_time: Duration = Field(1.0, ge=0)
    junk_command_limit: PostfixInt = Field(100, ge=1)
    disable_vrfy_command: bool = True
    # A text under every 4xx and 5xx reply (smtpd_reject_footer): `\n` (backslash, n) starts a line, each a copy of
    # the reply's codes; `\c` first puts the first part at the end of the reply's last line; macros: $client_address,
    # $helo_name, $server_name... (mailflow.reply_footer.FOOTER_MACROS).
    reject_footer: str = ""
    # MAIL FROM and RCPT TO addresses must be in angle brackets (strict_rfc821_envelopes: else 501 5.1.7 / 5.1.3,
    # logged as Postfix's "Illegal address syntax"); by default, as Postfix's, `MAIL FROM:a@b` is taken too.
    strict_rfc821_envelopes: bool = False
    # EHLO keywords neither announced nor accepted (smtpd_discard_ehlo_keywords; any case, e.g. ["pipelining",
    # "dsn"]): STARTTLS 502, AUTH 503, BDAT 521, DSN parameters 501 5.7.1, SMTPUTF8 an unsupported option; the
    # others only left out. Logged at each EHLO (`discarding EHLO keywords: ...`) unless "silent-discard" is in it.
    discard_ehlo_keywords: tuple[str, ...] = ()
    # Per client address, the keywords to discard in place of discard_ehlo_keywords (Postfix
    # smtpd_discard_ehlo_keyword_address_maps: looked up at connect; a value's unknown words are skipped).
    discard_ehlo_keyword_address_maps: TableSpecs = ()
    # smtpd_command_filter: each command line from a client (leading blanks skipped) rewritten by a table before it
    # is parsed (not DATA/BDAT content, not AUTH's continuation lines), to work around a broken client.
    command_filter: TableSpecs = ()
    # MAIL, RCPT and DATA before HELO/EHLO: 503 5.5.1 when true (smtpd_helo_required; Postfix's default: no).
    helo_required: bool = False
    # A command in this list, or one that looks like a message header (`Subject:`) or does not begin with a letter,
    # is not SMTP (an HTTP request, message content after a refused DATA): 221 2.7.0 and the connection is closed
    # (smtpd_forbidden_commands).
    forbid_cmds: tuple[str, ...] = ("CONNECT", "GET", "POST")
    # A session longer than this ends with 421 4.4.2 at its next command (with the per-command deadline, at
    # most `timeout` later); 0: no limit.
    session_time_limit: Duration = Field(3600.0, ge=0)
    # Trusted front ends (docs/security.md): the PROXY protocol of a load balancer (smtpd_upstream_proxy_protocol,
    # "haproxy": v1 or v2 header first, else 421 4.3.0 in place of the greeting, then closed; on a submissions
    # listener in clear before the TLS handshake, as Postfix's wrapper mode), accepted only from
    # upstream_proxy_clients; XCLIENT from authorized_xclient_hosts (smtpd_authorized_xclient_hosts; none by default).
    upstream_proxy_protocol: Literal["", "haproxy"] = ""
    upstream_proxy_timeout: Duration = Field(5.0, gt=0)
    upstream_proxy_clients: Networks = ("127.0.0.0/8", "::1/128")
    authorized_xclient_hosts: Networks = ()
    # Restrictions (docs/security.md): smtpd_*_restrictions, each an ordered list of "name" or
    # "name argument" items, evaluated at RCPT (client, helo, sender, relay, recipient; smtpd_delay_reject = yes),
    # at DATA and at the end of the message. relay_restrictions refuses relaying with 554 (Postfix defers: 454).
    # delay_reject false (smtpd_delay_reject = no): the client list at connect (its refusal in place of the
    # greeting, then 503 to every command but QUIT), the helo list at HELO/EHLO, the sender list at MAIL.
    # etrn_restrictions (smtpd_etrn_restrictions): at ETRN, after the client and helo lists (delay_reject true);
    # check_etrn_access looks up the site.
    # restriction_classes (smtpd_restriction_classes): `name = ["item", ...]`; a name is an item of any list,
    # of another class, or an access table's value. Declared before the lists, which are checked against it.
    restriction_classes: RestrictionClasses = FrozenMap()
    delay_reject: bool = True
    client_restrictions: tuple[Restriction, ...] = ()
    helo_restrictions: tuple[Restriction, ...] = ()
    sender_restrictions: tuple[Restriction, ...] = ()
    relay_restrictions: tuple[Restriction, ...] = ("permit_mynetworks", "permit_sasl_authenticated",
                                                   "reject_unauth_destination")
    recipient_restrictions: tuple[Restriction, ...] = ()
    data_restrictions: tuple[Restriction, ...] = ()
    end_of_data_restrictions: tuple[Restriction, ...] = ()
    etrn_restrictions: tuple[Restriction, ...] = ()
    reject_unlisted_recipient: bool = True
    # smtpd_reject_unlisted_sender: a sender of this host's domains no recipient table lists is refused (550
    # 5.1.0), after the sender list, as the reject_unlisted_sender item; plaintext_reject_code:
    # reject_plaintext_session's code
    reject_unlisted_sender: bool = False
    plaintext_reject_code: int = Field(450, ge=400, le=599)
    multi_recipient_bounce_reject_code: int = Field(550, ge=400, le=599)  # reject_multi_recipient_bounce's code
    # reject_unknown_client_hostname / reject_unknown_reverse_client_hostname (Postfix's unknown_client_reject_code):
    # the code for a client without a (verified) name; when the DNS cannot tell, 450 at once.
    unknown_client_reject_code: int = Field(450, ge=400, le=599)
    # reject_unknown_sender_domain / reject_unknown_recipient_domain (Postfix's unknown_address_reject_code,
    # unknown_address_tempfail_action): the code for a domain without MX or address record; when the DNS cannot
    # tell, 450 as a DEFER_IF_PERMIT (a later refusal wins) or at once (defer).
    unknown_address_reject_code: int = Field(450, ge=400, le=599)
    unknown_address_tempfail_action: Literal["defer_if_permit", "defer"] = "defer_if_permit"
    # reject_unknown_helo_hostname (Postfix's unknown_hostname_reject_code, unknown_helo_hostname_tempfail_action):
    # the code for a HELO name without A, AAAA or MX record; when the DNS cannot tell, 450 as a DEFER_IF_PERMIT
    # (a later refusal wins) or at once (defer).
    unknown_hostname_reject_code: int = Field(450, ge=400, le=599)
    unknown_helo_hostname_tempfail_action: Literal["defer_if_permit", "defer"] = "defer_if_permit"
    # permit_mx_backup: when set, every address of the domain's best MX hosts must be in these networks (Postfix's
    # permit_mx_backup_networks; mynetworks' syntax).
    permit_mx_backup_networks: Networks = ()
    # The permit actions whose permits are logged (`permit: RCPT from …: action=permit_mynetworks for Client
    # host=… ; from=<…> …`; Postfix's smtpd_log_access_permit_actions), any case: permit, permit_mynetworks,
    # permit_sasl_authenticated, permit_tls_(all_)clientcerts, permit_dnswl_client, permit_rhswl_client,
    # permit_mx_backup, permit_auth_destination, permit_naked_ip_address, and an access table's OK, RELAY, DISCARD
    # or all-digit value (`action=OK for Sender address=s@d from TABLE`); `static:all` names them all. Postfix's
    # other permit names are taken (a converted main.cf loads) and warned of when the restrictions are set up.
    log_access_permit_actions: tuple[str, ...] = ()
    # reject_unlisted_recipient: the code for a user its class's table does not list (Postfix's names; 450 while
    # testing a table: the client tries again), the enhanced code's class following it.
    unknown_local_recipient_reject_code: int = Field(550, ge=400, le=599)
    unknown_virtual_alias_reject_code: int = Field(550, ge=400, le=599)
    unknown_virtual_mailbox_reject_code: int = Field(550, ge=400, le=599)
    unknown_relay_recipient_reject_code: int = Field(550, ge=400, le=599)
    # reject_unverified_recipient / reject_unverified_sender (Postfix's names; [address_verify] runs the probes):
    # the code for an address whose probe failed (reject_code: bounced; defer_code: deferred or still under
    # way), how a 4xx is applied (tempfail_action: defer_if_permit, a later refusal wins; or defer, at once) and
    # a text in place of the probe's (reject_reason; "": the probe's).
    unverified_recipient_reject_code: int = Field(450, ge=400, le=599)
    unverified_recipient_defer_code: int = Field(450, ge=400, le=499)
    unverified_recipient_tempfail_action: Literal["defer_if_permit", "defer"] = "defer_if_permit"
    unverified_recipient_reject_reason: str = ""
    unverified_sender_reject_code: int = Field(450, ge=400, le=599)
    unverified_sender_defer_code: int = Field(450, ge=400, le=499)
    unverified_sender_tempfail_action: Literal["defer_if_permit", "defer"] = "defer_if_permit"
    unverified_sender_reject_reason: str = ""
    # reject_rbl_client and reject_rhsbl_*'s reply (Postfix's names): default_rbl_reply, a template with $rbl_code
    # (maps_rbl_reject_code), $rbl_class, $rbl_what, $rbl_domain, $rbl_reason (the list's TXT records) and smtpd's
    # macros ($client_address, ...: mailflow.rbl_reply.RBL_MACROS); rbl_reply_maps: a template per list, the key
    # the list as the restriction names it (`domain=filter` too, as Postfix 3.7 asks it)
    default_rbl_reply: str = DEFAULT_RBL_REPLY
    rbl_reply_maps: TableSpecs = ()
    maps_rbl_reject_code: int = Field(554, ge=400, le=599)
    # the lists reject_maps_rbl asks, in order, each as reject_rbl_client's argument (Postfix 3.7's old item)
    maps_rbl_domains: tuple[str, ...] = ()
    # The restrictions' own codes (Postfix's names; the enhanced code takes the code's class): an access table's or
    # policy server's REJECT, and its DEFER, DEFER_IF_PERMIT and DEFER_IF_REJECT; the reject and defer items;
    # reject_unauth_destination (less 100: defer_unauth_destination; a 4xx there leaves it Postfix's generic 450
    # 4.7.1 Service unavailable); reject_invalid_helo_hostname and an invalid address literal or naked address
    # (invalid_hostname); reject_non_fqdn_helo_hostname, _sender and _recipient.
    access_map_reject_code: int = Field(554, ge=400, le=599)
    access_map_defer_code: int = Field(450, ge=400, le=599)
    reject_code: int = Field(554, ge=400, le=599)
    defer_code: int = Field(450, ge=400, le=599)
    relay_domains_reject_code: int = Field(554, ge=400, le=599)
    # smtpd_null_access_lookup_key: the key check_sender_access asks for the null sender (`<>`), one word
    null_access_lookup_key: str = Field("<>", pattern=r"^\S+$")
    invalid_hostname_reject_code: int = Field(501, ge=400, le=599)
    non_fqdn_reject_code: int = Field(504, ge=400, le=599)
    policy_service_timeout: Duration = Field(100.0, gt=0)
    policy_service_default_action: str = "451 4.3.5 Server configuration problem"
    policy_service_policy_context: str = ""  # the requests' policy_context attribute
    policy_service_max_idle: Duration = Field(300.0, gt=0)  # an unused kept connection is closed after this
    policy_service_max_ttl: Duration = Field(1000.0, gt=0)  # any connection is closed this long after its opening
    policy_service_request_limit: PostfixInt = Field(0, ge=0)  # queries per connection (0: no limit)

    @field_validator("listeners", mode="before")
    @classmethod
    def _listeners_are_tables(cls, v: object) -> object:
        if isinstance(v, dict):  # ([smtpd.listeners] for [[smtpd.listeners]]: the one list of tables)
            raise ValueError("takes a list of tables ([[smtpd.listeners]] before each one), not one table")
        return v

    @model_validator(mode="after")
    def _relay_guarded(self) -> "SmtpdConfig":
        """Refuse to start when neither list can refuse relaying (Postfix's smtpd_check_init; stricter on purpose:
        a class reaching a bare permit before a guard leaves the list unguarded, see docs/security.md)."""
        found = {key: relay_guard(key, getattr(self, key), self.restriction_classes)
                 for key in ("relay_restrictions", "recipient_restrictions")}
        if all(f.result != GUARDED for f in found.values()):
            reasons = "; ".join(_unguarded_reason(key, f) for key, f in found.items())
            raise ValueError(f"relay_restrictions or recipient_restrictions must reach one of {', '.join(RELAY_GUARDS)}"
                             " before any permit of what the client chooses (permit, permit_naked_ip_address, a"
                             " permitting static: access table; in a class too), not after warn_if_reject"
                             f" ({reasons}): else this server relays for anyone")
        return self

    @field_validator("unknown_address_tempfail_action", "unknown_helo_hostname_tempfail_action",
                     "unverified_recipient_tempfail_action", "unverified_sender_tempfail_action", mode="before")
    @classmethod
    def _tempfail_action_any_case(cls, v: object) -> object:
        """DEFER is defer: Postfix reads its tempfail actions without regard to case (name_code)."""
        return v.lower() if isinstance(v, str) else v

    @field_validator("maps_rbl_domains")
    @classmethod
    def _maps_rbl_domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            check_item(f"reject_rbl_client {entry}")
        return v

    @field_validator("tls_fingerprint_digest")
    @classmethod
    def _fingerprint_digest(cls, v: str) -> str:
        name = v.strip().lower()
        if name not in FINGERPRINT_DIGESTS:
            raise ValueError(f"{v!r} is not a digest name ({', '.join(FINGERPRINT_DIGESTS)})")
        return name

    @field_validator("log_access_permit_actions")
    @classmethod
    def _logged_permits(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if name != ALL_PERMITS and not re.fullmatch(r"[A-Za-z0-9_]+", name):
                raise ValueError(f"{name!r} is not a permit action name nor {ALL_PERMITS} (mailflow logs the permits "
                                 f"of {', '.join(LOGGED_PERMITS)} and the access values {PERMIT_VALUES_TEXT})")
        return v

    @field_validator("reject_footer")
    @classmethod
    def _reject_footer(cls, v: str) -> str:
        return check_footer(v)

    @field_validator("default_rbl_reply")
    @classmethod
    def _default_rbl_reply(cls, v: str) -> str:
        return check_rbl_template(v)

    @field_validator("discard_ehlo_keywords")
    @classmethod
    def _discard_ehlo_keywords(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(discard_set(v)))

    @field_validator("sasl_path")
    @classmethod
    def _sasl_path(cls, v: str) -> str:
        if v and not v.startswith("/"):
            try:
                parse_endpoint(v)
            except ValueError:
                raise ValueError(f"{v!r} is not an auth socket (an absolute path, unix:/path or inet:host:port)")
        return v

    @field_validator("listeners")
    @classmethod
    def _listener_override_keys(cls, v: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        for index, listener in enumerate(v):
            for key in listener.overrides:
                if key not in cls.model_fields or key in SECTION_ONLY:
                    raise ValueError(f"listener {index} ({listener.address}): overrides.{key}: unknown setting")
        return v

    def listener_warnings(self) -> list[str]:
        """`key: reason` for each listener override that is taken but has no effect: postscreen.cache_limit (the
        server has one cache of passed clients; refusing it would stop a configuration accepted before)."""
        warnings = []
        for index, listener in enumerate(self.listeners):
            screen = listener.overrides.get("postscreen")
            if isinstance(screen, dict) and "cache_limit" in screen:
                warnings.append(f"smtpd.listeners: listener {index} ({listener.address}, {listener.role}): "
                                "overrides.postscreen.cache_limit: ignored: the server has one cache of passed clients "
                                f"for every listener, bounded by [smtpd.postscreen] cache_limit "
                                f"({self.postscreen.cache_limit})")
        return warnings

    @model_validator(mode="after")
    def _frontdoor_consistent(self) -> "SmtpdConfig":
        problem = self.frontdoor_problem()
        if problem:
            raise ValueError(problem)
        for index, listener in enumerate(self.listeners):
            try:
                effective = self.for_listener(listener)
            except ValidationError as e:
                err = e.errors()[0]
                key = validation_key(err)
                where = f"overrides.{key}: " if key else ""
                reason = validation_reason(err)
                raise ValueError(f"listener {index} ({listener.address}, {listener.role}): {where}{reason}") from None
            problem = effective.frontdoor_problem(listener.role)
            if problem:
                raise ValueError(f"listener {index} ({listener.address}, {listener.role}): {problem}")
        return self

    @property
    def ports(self) -> frozenset[int]:
        """The TCP ports of the listeners (`listen` and `listeners`) as configured; 0 is any free port."""
        return frozenset(parse_hostport(a)[1] for a in (*self.listen, *(x.address for x in self.listeners)))

    def listener_settings(self) -> list[tuple[str, str, "SmtpdConfig", str]]:
        """(address, role, effective settings, the key that names it) of every listener: each `listen` address
        (mta, these settings), then each `[[smtpd.listeners]]` entry."""
        specs = [(item, "mta", self, f"smtpd.listen[{i}]") for i, item in enumerate(self.listen)]
        specs += [(spec.address, spec.role, self.for_listener(spec), f"smtpd.listeners[{i}].address")
                  for i, spec in enumerate(self.listeners)]
        return specs

    def for_listener(self, listener: ListenerConfig) -> "SmtpdConfig":
        """The effective settings of one listener: these, then its role's presets, then its overrides."""
        return overlay(self, (LISTENER_ROLES[listener.role], listener.overrides), exclude={"listeners"},
                       merged_tables=MERGED_TABLES)

    def frontdoor_problem(self, role: str = "mta") -> str:
        """Why these TLS/AUTH (or postscreen) settings cannot work for a listener of `role`, or ""."""
        if self.postscreen.enable and role != "mta":
            return "postscreen screens mta listeners only (as Postfix's, on port 25)"
        needs_cert = self.tls_security_level == "encrypt" or role == "submissions"
        if needs_cert and not self.tls_cert_file:
            return "needs tls_cert_file (TLS is required)"
        if self.postscreen.tls_security_level == "encrypt" and not self.tls_cert_file:
            return "postscreen.tls_security_level \"encrypt\" needs tls_cert_file (TLS is required before MAIL)"
        if self.tls_key_file and not self.tls_cert_file:
            return "tls_key_file needs tls_cert_file"
        if self.tls_ask_ccert and not self.tls_ca_file:
            return ("tls_ask_ccert needs tls_ca_file (Python's ssl refuses a client certificate it cannot verify: "
                    "see docs/security.md)")
        if self.sasl_auth_enable and self.sasl_type == "mailflow" and not self.sasl_user_maps:
            return "sasl_auth_enable needs sasl_user_maps (the users and their password hashes)"
        if self.sasl_auth_enable and self.sasl_type == "dovecot" and not self.sasl_path:
            return "sasl_type \"dovecot\" needs sasl_path (Dovecot's auth socket, or inet:host:port)"
        if self.sasl_auth_required and not self.sasl_auth_enable:
            return "sasl_auth_required needs sasl_auth_enable"
        return ""
