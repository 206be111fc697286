"""The configuration: pydantic models, frozen, unknown keys rejected; every default lives here.

`load_config(path)` reads a TOML file (or nothing: the embedded defaults serve as they are) and returns a
`Config`. Any problem raises `ConfigError` naming the file, the dotted key and the reason. Names follow
Postfix's main.cf where Postfix has the setting (`mydestination`, `relayhost`, `maximal_backoff_time`, …).

Durations accept seconds as a number or a string with a unit: "30s", "5m", "1h", "5d", "1w".

Relative paths: every relative path in a configuration file, written or a default, is taken from that file's
directory, so `mailflow serve`, `mailflow sendmail` and the queue tools agree whatever directory they run in.
Without a file (the embedded defaults), from the current directory. `load_config` returns the paths absolute
(`resolve_paths`). Which settings are paths is told by their names: `*_file`, `*_directory`, `*_base` and
`directory` name files or directories; the items of `*_maps`, `authorized_submit_users` and `*_restrictions`
that are file-backed tables (`texthash:`, `regexp:`, `sqlite:`) name files; listener overrides follow the same
rule. `local.home_mailbox` is relative to each user's home, not to the file.
"""
from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from mailflow.address import normalise_domain

from mailflow.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '1h', '5d'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration (use seconds, or '30s', '5m', '1h', '5d', '1w')")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _restriction(value: object) -> str:
    """One smtpd restriction list item, checked against the vocabulary (unknown names fail at start)."""
    from mailflow.stages.smtpd.restrictions import check_item

    return check_item(value)


Restriction = Annotated[str, BeforeValidator(_restriction)]


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:25', 'mx.example:587' -> (host, port). Brackets are dropped."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not host:port")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    if port is None:
        if default_port is None:
            raise ValueError(f"{value!r} needs a port (host:port)")
        return host, default_port
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port out of range")
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Front door: what a listener role presets before its own overrides (master.cf `-o`); see ListenerConfig.
LISTENER_ROLES: dict[str, dict[str, object]] = {
    "mta": {},
    "submission": {"tls_security_level": "encrypt", "sasl_auth_enable": True, "sasl_auth_required": True},
    "submissions": {"sasl_auth_enable": True, "sasl_auth_required": True},
}


class ListenerConfig(_Section):
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


class SmtpdConfig(_Section):
    """The SMTP server (Postfix smtpd)."""

    listen: tuple[str, ...] = ("127.0.0.1:2525",)
    banner: str = "ESMTP mailflow"
    message_size_limit: int = Field(10_240_000, ge=0)
    recipient_limit: int = Field(1000, ge=1)
    # 452 answers past recipient_limit count as errors only beyond this many (smtpd_recipient_overshoot_limit).
    recipient_overshoot_limit: int = Field(1000, ge=0)
    timeout: Duration = 300.0
    max_line_length: int = Field(2048, ge=512)
    # Front door (docs/security.md): listeners with roles, TLS, AUTH, connection limits.
    # `listen` addresses are mta listeners; `listeners` add listeners with a role and per-listener overrides.
    listeners: tuple[ListenerConfig, ...] = ()
    # TLS (smtpd_tls_cert_file/key_file; "" key: the key is in the cert file); "may" offers STARTTLS when a
    # certificate is configured, "encrypt" requires it before any mail command (smtpd_tls_security_level).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_security_level: Literal["none", "may", "encrypt"] = "may"
    # AUTH PLAIN/LOGIN over TLS (smtpd_sasl_auth_enable) against sasl_user_maps (`user scrypt-hash`, made by
    # `mailflow auth hash-password`); sasl_auth_required: MAIL needs AUTH (530 5.7.0).
    sasl_auth_enable: bool = False
    sasl_auth_required: bool = False
    sasl_user_maps: tuple[str, ...] = ()
    allow_plaintext_auth_on_loopback: bool = False
    # smtpd_sender_login_maps (sender -> logins owning it) and reject_sender_login_mismatch (553 5.7.1).
    sender_login_maps: tuple[str, ...] = ()
    reject_sender_login_mismatch: bool = False
    # A failed AUTH is answered after a delay doubling per recent failure of the client, up to the limit.
    auth_failure_delay: Duration = 1.0
    auth_failure_delay_limit: Duration = 16.0
    # anvil: sessions at once and new sessions per anvil_rate_time_unit per client IP (0: no limit; mynetworks
    # exempt), and sessions at once per listener (more wait for a slot; beyond twice as many: 421 4.3.2).
    client_connection_count_limit: int = Field(50, ge=0)
    client_connection_rate_limit: int = Field(0, ge=0)
    anvil_rate_time_unit: Duration = Field(60.0, gt=0)
    max_sessions: int = Field(100, ge=1)
    # Protocol (docs/security.md): bare LF/CR refused with 521 and a disconnect
    # (smtpd_forbid_bare_newline = reject); input before the greeting or pipelined where RFC 2920 forbids it
    # refused with 554 and a disconnect (smtpd_forbid_unauth_pipelining); DATA must keep min_data_rate bytes/s
    # beyond `timeout` (smtpd_min_data_rate); error tarpit and limit; junk commands; VRFY.
    forbid_bare_newline: bool = True
    forbid_unauth_pipelining: bool = True
    min_data_rate: int = Field(500, ge=0)
    soft_error_limit: int = Field(10, ge=0)
    hard_error_limit: int = Field(20, ge=1)
    error_sleep_time: Duration = Field(1.0, ge=0)
    junk_command_limit: int = Field(100, ge=1)
    disable_vrfy_command: bool = True
    # A session longer than this ends with 421 4.4.2 at its next command (with the per-command deadline, at
    # most `timeout` later); 0: no limit.
    session_time_limit: Duration = Field(3600.0, ge=0)
    # Trusted front ends (docs/security.md): the PROXY protocol of a load balancer (smtpd_upstream_proxy_protocol,
    # "haproxy": v1 or v2 header first, else the connection is dropped without a greeting), accepted only from
    # upstream_proxy_clients; XCLIENT from authorized_xclient_hosts (smtpd_authorized_xclient_hosts; none by default).
    upstream_proxy_protocol: Literal["", "haproxy"] = ""
    upstream_proxy_timeout: Duration = Field(5.0, gt=0)
    upstream_proxy_clients: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    authorized_xclient_hosts: tuple[str, ...] = ()
    # Restrictions (docs/security.md): smtpd_*_restrictions, each an ordered list of "name" or
    # "name argument" items, evaluated at RCPT (client, helo, sender, relay, recipient; smtpd_delay_reject = yes),
    # at DATA and at the end of the message. relay_restrictions refuses relaying with 554 (Postfix defers: 454).
    client_restrictions: tuple[Restriction, ...] = ()
    helo_restrictions: tuple[Restriction, ...] = ()
    sender_restrictions: tuple[Restriction, ...] = ()
    relay_restrictions: tuple[Restriction, ...] = ("permit_mynetworks", "permit_sasl_authenticated",
                                                   "reject_unauth_destination")
    recipient_restrictions: tuple[Restriction, ...] = ()
    data_restrictions: tuple[Restriction, ...] = ()
    end_of_data_restrictions: tuple[Restriction, ...] = ()
    reject_unlisted_recipient: bool = True
    unknown_address_reject_code: int = Field(450, ge=400, le=599)
    policy_service_timeout: Duration = Field(100.0, gt=0)
    policy_service_default_action: str = "451 4.3.5 Server configuration problem"

    @model_validator(mode="after")
    def _relay_guarded(self) -> "SmtpdConfig":
        """Like Postfix, refuse to start when neither list can refuse relaying."""
        guards = {"reject_unauth_destination", "defer_unauth_destination", "reject", "defer"}
        items = self.relay_restrictions + self.recipient_restrictions
        names = {item.strip().split(" ", 1)[0].lower() for item in items}
        if not names & guards:
            raise ValueError("relay_restrictions or recipient_restrictions must hold one of reject_unauth_destination,"
                             " defer_unauth_destination, reject, defer (else this server relays for anyone)")
        return self

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            parse_hostport(item)
        return v

    @field_validator("upstream_proxy_clients", "authorized_xclient_hosts")
    @classmethod
    def _frontend_networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            ipaddress.ip_network(item, strict=False)
        return v

    @field_validator("sasl_user_maps", "sender_login_maps")
    @classmethod
    def _frontdoor_tables(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mailflow.tables import TYPES

        for spec in v:
            kind, colon, _ = spec.partition(":")
            if not colon or kind not in TYPES:
                raise ValueError(f"{spec!r} is not a lookup table (type:name with type one of {', '.join(TYPES)})")
        return v

    @field_validator("listeners")
    @classmethod
    def _listener_override_keys(cls, v: tuple[ListenerConfig, ...]) -> tuple[ListenerConfig, ...]:
        for index, listener in enumerate(v):
            for key in listener.overrides:
                if key not in cls.model_fields or key in ("listen", "listeners"):
                    raise ValueError(f"listener {index} ({listener.address}): overrides.{key}: unknown setting")
        return v

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
                key = ".".join(str(p) for p in err["loc"])
                where = f"overrides.{key}: " if key else ""
                raise ValueError(f"listener {index} ({listener.address}, {listener.role}): {where}{_reason(err)}") from None
            problem = effective.frontdoor_problem(listener.role)
            if problem:
                raise ValueError(f"listener {index} ({listener.address}, {listener.role}): {problem}")
        return self

    def for_listener(self, listener: ListenerConfig) -> "SmtpdConfig":
        """The effective settings of one listener: these, then its role's presets, then its overrides."""
        data = self.model_dump(exclude={"listeners"})
        data.update(LISTENER_ROLES[listener.role])
        data.update(listener.overrides)
        return SmtpdConfig.model_validate(data)

    def frontdoor_problem(self, role: str = "mta") -> str:
        """Why these TLS/AUTH settings cannot work for a listener of `role`, or ""."""
        needs_cert = self.tls_security_level == "encrypt" or role == "submissions"
        if needs_cert and not self.tls_cert_file:
            return "needs tls_cert_file (TLS is required)"
        if self.tls_key_file and not self.tls_cert_file:
            return "tls_key_file needs tls_cert_file"
        if self.sasl_auth_enable and not self.sasl_user_maps:
            return "sasl_auth_enable needs sasl_user_maps (the users and their password hashes)"
        if self.sasl_auth_required and not self.sasl_auth_enable:
            return "sasl_auth_required needs sasl_auth_enable"
        if self.upstream_proxy_protocol and role == "submissions":
            return "upstream_proxy_protocol cannot work with implicit TLS (the header comes before the handshake)"
        return ""


class LocalConfig(_Section):
    """Local delivery (Postfix local): each user's home is `<maildir_base>/<user>/`, holding `Maildir/` and an
    optional `.forward`. Commands (`|cmd`) and files (`/path`) may come only from the sources listed here:
    "alias" (alias_maps), "forward" (.forward files), "include" (:include: files)."""

    maildir_base: str = "var/mail"
    allow_mail_to_commands: tuple[Literal["alias", "forward", "include"], ...] = ("alias", "forward")
    # `|command` destinations run as default_privs when mailflow runs as root (else as mailflow's own user),
    # and are killed after command_time_limit (Postfix default_privs, command_time_limit).
    default_privs: str = "nobody"
    command_time_limit: Duration = Field(1000.0, gt=0)
    allow_mail_to_files: tuple[Literal["alias", "forward", "include"], ...] = ("alias", "forward")
    # The mailbox, relative to the home: ending in "/" a Maildir, else an mbox file; "" = mail_spool_directory.
    home_mailbox: str = "Maildir/"
    # With home_mailbox "": <mail_spool_directory>/<user> is an mbox file (a Maildir when this ends in "/").
    mail_spool_directory: str = "var/spool/mail"
    # How an mbox file is locked, in this order (Postfix mailbox_delivery_lock).
    mailbox_delivery_lock: tuple[Literal["fcntl", "flock", "dotlock"], ...] = ("fcntl", "dotlock")

    @field_validator("home_mailbox")
    @classmethod
    def _home_mailbox(cls, v: str) -> str:
        if v.startswith("/") or ".." in Path(v).parts:
            raise ValueError(f"{v!r} must be relative to the home, without '..'")
        return v

    @field_validator("mail_spool_directory")
    @classmethod
    def _spool(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a directory")
        return v

    @field_validator("mailbox_delivery_lock")
    @classmethod
    def _locks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("name each lock style (fcntl, flock, dotlock) at most once, at least one")
        return v

    @field_validator("default_privs")
    @classmethod
    def _default_privs(cls, v: str) -> str:
        if not v.strip() or v == "root":
            raise ValueError(f"{v!r}: name an unprivileged user (not root)")
        return v


class SmtpConfig(_Section):
    """The SMTP client (Postfix smtp): relay and MX delivery."""

    port: int = Field(25, ge=1, le=65535)
    connect_timeout: Duration = 30.0
    helo_timeout: Duration = 300.0
    command_timeout: Duration = 300.0
    data_timeout: Duration = 600.0
    # TLS (smtp_tls_*): the level, per-nexthop overrides, trust anchors ("" = the system's), client certificate.
    tls_security_level: Literal["none", "may", "encrypt", "verify", "secure"] = "may"
    tls_policy_maps: tuple[str, ...] = ()
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # AUTH to a relay (smtp_sasl_password_maps): "user:password" by MX host name or nexthop as written.
    sasl_password_maps: tuple[str, ...] = ()
    sasl_tls_required: bool = True
    # Connection cache (smtp_connection_cache_time_limit, smtp_connection_reuse_count/time_limit); 0s: off.
    connection_cache_time_limit: Duration = 2.0
    connection_reuse_count_limit: int = Field(100, ge=0)
    connection_reuse_time_limit: Duration = 300.0

    @field_validator("tls_policy_maps", "sasl_password_maps")
    @classmethod
    def _smtp_tables(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mailflow.tables import TYPES

        for spec in v:
            kind, colon, _ = spec.partition(":")
            if not colon or kind not in TYPES:
                raise ValueError(f"{spec!r} is not a lookup table (type:name with type one of {', '.join(TYPES)})")
        return v

    @field_validator("tls_key_file")
    @classmethod
    def _key_needs_cert(cls, v: str, info: ValidationInfo) -> str:
        if v and not info.data.get("tls_cert_file"):
            raise ValueError("needs tls_cert_file (the certificate the key belongs to)")
        return v


class LmtpConfig(_Section):
    """The LMTP client (Postfix lmtp): final delivery to a mailbox server such as Dovecot. `port` is used when the
    nexthop names none; each stage of the dialogue has its own limit (none of them may be 0)."""

    port: int = Field(24, ge=1, le=65535)
    connect_timeout: Duration = Field(30.0, gt=0)
    command_timeout: Duration = Field(300.0, gt=0)
    data_timeout: Duration = Field(600.0, gt=0)


class DnsConfig(_Section):
    """Where MX and address lookups go: empty means the system's resolv.conf. Entries are 'ip' or 'ip:port'."""

    nameservers: tuple[str, ...] = ()
    timeout: Duration = 5.0
    tries: int = Field(2, ge=1)


class QueueConfig(_Section):
    """The queue manager (Postfix qmgr) and the store."""

    queue_run_delay: Duration = 300.0
    minimal_backoff_time: Duration = 300.0
    maximal_backoff_time: Duration = Field(4000.0, validate_default=True)
    # Deferred mail older than this is returned to the sender; null-sender mail (bounces) gives up sooner.
    maximal_queue_lifetime: Duration = 5 * 86400.0
    bounce_queue_lifetime: Duration = 5 * 86400.0
    # Send the sender one "delayed" notice once a message has waited this long; 0 disables it.
    delay_warning_time: Duration = 0.0
    # Where a bounce that cannot be returned (its own sender is null) goes; "" drops it (logged).
    double_bounce_recipient: str = "postmaster"
    # Bounces carry the whole original up to this many bytes, else its headers only.
    bounce_size_limit: int = Field(50_000, ge=0)
    active_limit: int = Field(10_000, ge=1)
    # Per destination (transport, nexthop): start at the initial concurrency, grow on success up to the
    # limit, shrink on a site failure; after `failed_cohort_limit` failed rounds in a row the destination is
    # dead for `minimal_backoff_time`, and its mail is deferred without a connection attempt.
    initial_destination_concurrency: int = Field(5, ge=1)
    default_destination_concurrency_limit: int = Field(20, ge=1)
    destination_concurrency_failed_cohort_limit: int = Field(1, ge=1)
    # Deliveries at once over all destinations, and per transport where a cap is set ({ smtp = 50 }).
    delivery_concurrency_limit: int = Field(100, ge=1)
    transport_concurrency_limit: dict[str, Annotated[int, Field(ge=1)]] = {}
    commit_batch_limit: int = Field(500, ge=1)
    incoming_backlog_limit: int = Field(5000, ge=1)
    # Bytes of free space the queue's file system must keep (Postfix queue_minfree): smtpd answers MAIL with
    # 452 4.3.1 below max(queue_minfree, 1.5 x smtpd.message_size_limit), or when a SIZE= parameter would not
    # leave that much or is more than half the free space.
    queue_minfree: int = Field(0, ge=0)

    @field_validator("maximal_backoff_time")
    @classmethod
    def _backoff_order(cls, v: float, info: ValidationInfo) -> float:
        minimal = info.data.get("minimal_backoff_time")
        if minimal is not None and v < minimal:
            raise ValueError(f"is smaller than minimal_backoff_time ({minimal:g}s)")
        return v


class SendmailConfig(_Section):
    """Local submission (docs/sendmail.md): `mailflow sendmail` writes to <queue_directory>/maildrop/, the pickup
    stage feeds it to cleanup. Items of both lists are login names or `type:name` tables keyed by login name."""

    # Who may submit with sendmail (Postfix authorized_submit_users): "static:anyone" (any value found
    # means allowed), login names, "!name" to refuse one; the first item that matches decides. Others: exit 77.
    authorized_submit_users: tuple[str, ...] = ("static:anyone",)
    # Which envelope senders (-f/-r, MAIL FROM in -bs) each login may use (Postfix local_login_sender_maps):
    # a table's value lists patterns: "*" any, "<>" the null sender, "@domain", an address, a bare local part
    # (qualified with myorigin). Everyone may use login@myorigin. Unlike Postfix (static:*), only root may
    # name any sender by default.
    local_login_sender_maps: tuple[str, ...] = ("inline:{root=*}",)
    # pickup scans the maildrop at start, when sendmail wakes it (public/pickup), and at least this often.
    pickup_interval: Duration = Field(60.0, gt=0)

    @field_validator("authorized_submit_users", "local_login_sender_maps")
    @classmethod
    def _user_tables(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        from mailflow.tables import TYPES

        for item in v:
            kind, colon, _ = item.partition(":")
            if colon and kind not in TYPES:
                raise ValueError(f"{item!r} is not a lookup table (type:name with type one of {', '.join(TYPES)})")
            if not colon and info.field_name == "local_login_sender_maps":
                raise ValueError(f"{item!r} is not a lookup table (type:name)")
        return v


class LogConfig(_Section):
    """The mail log (mailflow.logs): "text" is Postfix's syslog layout (`TIME HOST syslog_name/service[pid]: …`,
    what pflogsumm and fail2ban read); "json" one object per line. `file` (Postfix maillog_file): "" is stderr."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # Postfix syslog_name: "postfix-<name>" is how Postfix names a second instance, which fail2ban's stock
    # postfix filter matches as it is; pflogsumm wants --syslog-name=postfix-mailflow.
    syslog_name: str = Field("postfix-mailflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    file: str = ""


class PipeService(_Section):
    """One `[pipe.NAME]` delivery service (a Postfix pipe(8) master.cf entry): transport_maps values `NAME:`
    send mail to it. See mailflow.transports.pipe for the macros and flags."""

    # The command, run without a shell; argv[0] an absolute path; ${recipient} etc. expand to single elements.
    argv: tuple[str, ...]
    # Run as this user (mailflow must be root to switch); "" = as mailflow runs, or `nobody` when it runs as root.
    user: str = ""
    time_limit: Duration = Field(1000.0, gt=0)
    # Bytes of command output kept for the diagnostic; the rest is read and dropped.
    output_limit: int = Field(2048, ge=1)
    # A subset of Postfix's pipe flags: B D F O R h q u . >
    flags: str = ""
    # Larger messages bounce (5.2.3) without running the command; 0: no limit.
    size_limit: int = Field(0, ge=0)
    # What ${sender} becomes for the null sender.
    null_sender: str = "MAILER-DAEMON"
    # The command's working directory; "" = "/".
    directory: str = ""

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mailflow.transports.pipe import parse_argv

        if not v or not v[0].startswith("/") or "$" in v[0]:
            raise ValueError("must start with the command's absolute path (no macros in it)")
        parse_argv(v)
        return v

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if v == "root":
            raise ValueError("commands never run as root")
        return v

    @field_validator("directory")
    @classmethod
    def _directory(cls, v: str) -> str:
        if v and not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path")
        return v

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: str) -> str:
        from mailflow.transports.pipe import check_flags

        return check_flags(v)


_DOTTED_DOMAIN = {
    False: "{entry!r}: this is an exact list (as Postfix's): a leading '.' would match no domain; "
           "list each domain, subdomains included",
    True: "{entry!r}: a relay_domains entry already matches its subdomains (Postfix "
          "parent_domain_matches_subdomains); write it without the leading '.'",
}

BUILTIN_TRANSPORTS = ("local", "virtual", "smtp", "relay", "lmtp", "discard", "error")


class Config(_Section):
    """The whole configuration. Section tables: smtpd, local, smtp, lmtp, dns, queue, log, sendmail."""

    myhostname: str = "localhost"
    # Appended to unqualified addresses (user -> user@myorigin); "" means myhostname. mydomain ("": myhostname
    # without its first label) is appended to user@host when append_dot_mydomain is on.
    myorigin: str = ""
    mydomain: str = ""
    append_dot_mydomain: bool = False
    mydestination: tuple[str, ...] = ("localhost",)
    relay_domains: tuple[str, ...] = ()
    # Addresses (besides the IP listener addresses) at which clients reach this server, e.g. through NAT or a
    # proxy: user@[address] is local for each (Postfix proxy_interfaces).
    proxy_interfaces: tuple[str, ...] = ()
    # user%domain@<a local domain> is user@domain, routed (and relay-checked) as such (allow_percent_hack).
    allow_percent_hack: bool = True
    mynetworks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    relayhost: str = ""
    local_transport: str = "local"
    relay_transport: str = "smtp"
    default_transport: str = "smtp"
    # Lookup tables (`type:name`, searched in order): transport:nexthop per address or domain, overriding
    # the class's transport; and the known recipients of relay_domains (empty: any recipient is accepted).
    transport_maps: tuple[str, ...] = ()
    relay_recipient_maps: tuple[str, ...] = ()
    # Hosted domains whose users have mailboxes here but no local account (the virtual mailbox class):
    # virtual_mailbox_maps map user@domain (or @domain) to a Maildir path under virtual_mailbox_base,
    # ending in "/" (e.g. "example.com/alice/"); a recipient not in the maps gets 550 5.1.1 at RCPT.
    virtual_mailbox_domains: tuple[str, ...] = ()
    virtual_mailbox_maps: tuple[str, ...] = ()
    virtual_mailbox_base: str = "var/vmail"
    virtual_transport: str = "virtual"
    # Quota of a virtual mailbox: the bytes of its messages (new/ and cur/) plus the new one; 0: no limit.
    # virtual_mailbox_limit_maps give per-address limits (bytes). Over quota: bounce 5.2.2, or with
    # virtual_overquota_bounce = false defer 4.2.2 (the names of Postfix's VDA quota patch).
    virtual_mailbox_limit: int = Field(0, ge=0)
    virtual_mailbox_limit_maps: tuple[str, ...] = ()
    virtual_overquota_bounce: bool = True
    # Local users (local_recipient_maps) and local aliases (alias_maps: aliases(5) files when texthash). A local
    # recipient is known when either table has its local part; empty local_recipient_maps: any is.
    local_recipient_maps: tuple[str, ...] = ("inline:{postmaster=postmaster}",)
    alias_maps: tuple[str, ...] = ()
    # Address rewriting in cleanup (canonical(5)): sender_/recipient_canonical_maps first, then canonical_maps.
    canonical_maps: tuple[str, ...] = ()
    sender_canonical_maps: tuple[str, ...] = ()
    recipient_canonical_maps: tuple[str, ...] = ()
    # Envelope senders in a subdomain of these lose the subdomain (a.b.example.com -> example.com); an entry
    # "!host.example.com" keeps that one; masquerade_exceptions lists users never masqueraded.
    masquerade_domains: tuple[str, ...] = ()
    masquerade_exceptions: tuple[str, ...] = ()
    # virtual(5): virtual_alias_maps rewrite recipients of any domain to one or more addresses, recursively;
    # virtual_alias_domains are domains with aliases only (an address without an alias gets 550 5.1.1).
    virtual_alias_domains: tuple[str, ...] = ()
    virtual_alias_maps: tuple[str, ...] = ()
    virtual_alias_recursion_limit: int = Field(1000, ge=1)
    virtual_alias_expansion_limit: int = Field(1000, ge=1)
    recipient_delimiter: str = "+"
    # Postfix allow_min_user: false refuses a sender or recipient beginning with '-' (smtpd: 501 5.1.7 / 5.1.3;
    # pipe and local bounce it), so that no address reaches a command's argv as an option.
    allow_min_user: bool = False
    # cleanup's limits on a message (Postfix names): more Received headers than hopcount_limit is a mail loop
    # (554 5.4.6); a header section larger than header_size_limit bytes is refused (552 5.3.4).
    hopcount_limit: int = Field(50, ge=1)
    header_size_limit: int = Field(102400, ge=1024)
    queue_directory: str = "var"

    smtpd: SmtpdConfig = SmtpdConfig()
    local: LocalConfig = LocalConfig()
    smtp: SmtpConfig = SmtpConfig()
    lmtp: LmtpConfig = LmtpConfig()
    dns: DnsConfig = DnsConfig()
    queue: QueueConfig = QueueConfig()
    log: LogConfig = LogConfig()
    sendmail: SendmailConfig = SendmailConfig()
    # Delivery to commands: [pipe.NAME] tables (PipeService), each a transport named NAME.
    pipe: dict[str, PipeService] = {}
    # The directory relative paths were taken from (None: as written); set by resolve_paths.
    _base: Path | None = PrivateAttr(None)

    @field_validator("pipe")
    @classmethod
    def _pipe_names(cls, v: dict[str, PipeService]) -> dict[str, PipeService]:
        for name in v:
            if name in BUILTIN_TRANSPORTS:
                raise ValueError(f"{name!r} is the name of a built-in transport")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"{name!r} is not a transport name (letters, digits, '_', '-')")
        return v

    @field_validator("mynetworks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            ipaddress.ip_network(item, strict=False)
        return v

    @field_validator("mydestination", "relay_domains", "virtual_mailbox_domains", "virtual_alias_domains",
                     "masquerade_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Domains are stored normalised (lower case, IDNA A-labels); masquerade_domains also take
        "!host.example.com" (an exception). A ".example.com" entry is refused where Postfix would match it
        against nothing: mydestination and the virtual domain lists are exact lists, and a relay_domains
        entry already covers its subdomains."""
        marks = ".!" if info.field_name == "masquerade_domains" else ""
        out = []
        for entry in (d.strip() for d in v if d.strip()):
            if entry.startswith(".") and info.field_name != "masquerade_domains":
                raise ValueError(_DOTTED_DOMAIN[info.field_name == "relay_domains"].format(entry=entry))
            mark = entry[0] if entry[0] in marks else ""
            normal = normalise_domain(entry[len(mark):])
            if not normal:
                raise ValueError(f"{entry!r} is not a domain name")
            out.append(mark + normal)
        return tuple(out)

    @field_validator("proxy_interfaces")
    @classmethod
    def _interfaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            try:
                ipaddress.ip_address(item.strip("[]"))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address") from None
        return v

    @field_validator("relayhost")
    @classmethod
    def _relayhost(cls, v: str) -> str:
        if v:
            parse_hostport(v, default_port=25)
        return v

    @field_validator("local_transport", "relay_transport", "default_transport", "virtual_transport")
    @classmethod
    def _transport(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+(:.*)?", v):
            raise ValueError(f"{v!r} is not transport or transport:nexthop")
        return v

    @field_validator("transport_maps", "relay_recipient_maps", "virtual_mailbox_maps", "virtual_mailbox_limit_maps",
                     "local_recipient_maps",
                     "alias_maps", "canonical_maps", "sender_canonical_maps", "recipient_canonical_maps",
                     "virtual_alias_maps")
    @classmethod
    def _tables(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from mailflow.tables import TYPES

        for spec in v:
            kind, colon, name = spec.partition(":")
            if not colon or kind not in TYPES:
                raise ValueError(f"{spec!r} is not a lookup table (type:name with type one of {', '.join(TYPES)})")
        return v

    @field_validator("myorigin", "mydomain")
    @classmethod
    def _domain(cls, v: str) -> str:
        if v and not normalise_domain(v):
            raise ValueError(f"{v!r} is not a domain name")
        return normalise_domain(v) if v else v

    @property
    def queue_path(self) -> Path:
        return Path(self.queue_directory)

    @property
    def origin(self) -> str:
        """myorigin, defaulting to myhostname."""
        return self.myorigin or self.myhostname

    @property
    def domain(self) -> str:
        """mydomain, defaulting to myhostname without its first label (myhostname itself if it has one)."""
        if self.mydomain:
            return self.mydomain
        first, dot, rest = self.myhostname.partition(".")
        return rest if dot and rest else self.myhostname


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate `path` (TOML); None gives the embedded defaults. Relative paths are made absolute from
    the file's directory (from the current directory for the defaults). Raises ConfigError."""
    if path is None:
        return resolve_paths(Config(), Path.cwd())
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(name, "", "no such file") from None
    except OSError as e:
        raise ConfigError(name, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(name, "", f"not valid TOML: {e}") from None
    return config_from_dict(data, name, base=Path(path).absolute().parent)


def config_from_dict(data: dict, name: str = "<config>", base: Path | None = None) -> Config:
    """Validate `data`; with `base`, relative paths are taken from that directory (else kept as written)."""
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "(top level)"
        reason = _reason(err)
        more = len(e.errors()) - 1
        if more:
            reason += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise ConfigError(name, key, reason) from None
    return config if base is None else resolve_paths(config, base)


# ---------------------------------------------------------------------------------------------- paths

FILE_TABLE_TYPES = ("texthash", "regexp", "sqlite")  # table types whose name is a file


def resolve_paths(config: Config, base: Path) -> Config:
    """`config` with every relative path setting (see the module docstring) taken from `base`."""
    resolved = _resolve_section(config, Path(base))
    if resolved is config:
        resolved = config.model_copy()
    resolved._base = Path(base)
    return resolved


def _resolve_section(section: _Section, base: Path) -> _Section:
    updates = {}
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, _Section):
            new = _resolve_section(value, base)
        elif isinstance(value, tuple) and value and all(isinstance(v, _Section) for v in value):
            new = tuple(_resolve_section(v, base) for v in value)
        elif isinstance(value, dict) and value and all(isinstance(v, _Section) for v in value.values()):
            new = {k: _resolve_section(v, base) for k, v in value.items()}
        elif name == "overrides" and isinstance(value, dict):  # a listener's: keys are [smtpd] settings
            new = {k: _resolve_setting(k, v, base) for k, v in value.items()}
        else:
            new = _resolve_setting(name, value, base)
        if new != value:
            updates[name] = new
    return section.model_copy(update=updates) if updates else section


def _resolve_setting(name: str, value: object, base: Path) -> object:
    if name.endswith(("_file", "_directory", "_base")) or name == "directory":
        return _resolve_path(value, base) if isinstance(value, str) else value
    if name.endswith("_maps") or name == "authorized_submit_users":
        return tuple(_resolve_table(v, base) for v in value) if isinstance(value, (tuple, list)) else value
    if name.endswith("_restrictions") and isinstance(value, (tuple, list)):
        return tuple(_resolve_restriction(item, base) for item in value)
    return value


def _resolve_restriction(item: str, base: Path) -> str:
    """`check_sender_access texthash:access` -> `… texthash:/base/access`; an item naming no file stays as is."""
    words = item.split()
    resolved = [_resolve_table(word, base) for word in words]
    return " ".join(resolved) if resolved != words else item


def _resolve_path(value: str, base: Path) -> str:
    return value if not value or Path(value).is_absolute() else str(base / value)


def _resolve_table(spec: str, base: Path) -> str:
    """`texthash:relative` -> `texthash:/base/relative`; other tables and plain words stay as they are."""
    kind, colon, name = spec.partition(":")
    if not colon or kind.strip().lower() not in FILE_TABLE_TYPES or not name.strip():
        return spec
    return f"{kind}:{_resolve_path(name.strip(), base)}"


def _reason(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown setting"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def flat_settings(config: Config) -> dict[str, object]:
    """Every setting as `section.key -> value` (top-level keys have no section), in declaration order."""
    out: dict[str, object] = {}
    for name, value in config.model_dump().items():
        if isinstance(value, dict) and name in Config.model_fields and isinstance(getattr(config, name), _Section):
            for key, inner in value.items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def format_setting(key: str, value: object) -> str:
    """`key = value` with the value in TOML syntax (durations in seconds), like one line of postconf."""
    return f"{key} = {_toml_value(value)}"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def show_settings(config: Config, *, defaults: bool = False, changed_only: bool = False) -> list[str]:
    """postconf's views: every effective setting; `defaults`: the built-in defaults (postconf -d);
    `changed_only`: only what differs from them (postconf -n)."""
    default = flat_settings(Config() if config._base is None else resolve_paths(Config(), config._base))
    if defaults:
        return [format_setting(k, v) for k, v in default.items()]
    current = flat_settings(config)
    return [format_setting(k, v) for k, v in current.items() if not changed_only or default.get(k) != v]
