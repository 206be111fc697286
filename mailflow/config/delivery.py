"""The delivery sections: `[local]` (local(8)), `[smtp]` and `[lmtp]` (the SMTP-family clients), `[dns]` (where
their lookups go) and `[pipe.NAME]` (pipe(8) services).

    LocalConfig, SmtpConfig, LmtpConfig, DnsConfig, PipeService
    SmtpService, LmtpService     one `[smtp.services.NAME]` / `[lmtp.services.NAME]` table: a named client service
                                 (master.cf's `smtp-amavis unix … smtp -o …`), any of its section's keys; the keys it
                                 sets replace the section's (`SmtpConfig.for_service(NAME)`: the merged settings,
                                 validated as the section is); it is a transport named NAME (`relay`, [smtp]'s
                                 otherwise, may be one: REPLACEABLE)
    SmtpSettings, LmtpSettings   the keys a section and each of its services may set
    ClientServices               what SmtpConfig and LmtpConfig share about their services (names, dump, merge)
    SmtpConfig.key_source(transport, key)   the dotted key a transport's SMTP client value is set by

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded): a mailbox path outside the home,
an unprivileged user that is root, a key without its certificate, an unknown pipe macro or flag, a service's
unknown key (`smtp.services.NAME.KEY: unknown setting`), a service named as a built-in transport.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, Mapping, Self, TypeVar

from pydantic import (AfterValidator, Field, ValidationError, ValidationInfo, field_serializer, field_validator,
                      model_validator)

from mailflow.config.base import (Duration, InlineTableSpecs, NestedRefusal, PostfixInt, Section, TableSpecs,
                                  check_service_names, check_transport, overlay, validation_key, validation_reason)
from mailflow.local_macros import check_local_macros
from mailflow.pipe_argv import check_flags, parse_argv
from mailflow.syntax import parse_hostport, parse_ip


class LocalConfig(Section):
    """Local delivery (Postfix local): each user's home is `<maildir_base>/<user>/`, holding `Maildir/` and an
    optional `.forward`. Commands (`|cmd`) and files (`/path`) may come only from the sources listed here:
    "alias" (alias_maps), "forward" (.forward files), "include" (:include: files)."""

    maildir_base: str = "var/mail"
    allow_mail_to_commands: tuple[Literal["alias", "forward", "include"], ...] = ("alias", "forward")
    # `|command` destinations run as default_privs when mailflow runs as root (else as mailflow's own user),
    # and are killed after command_time_limit (Postfix default_privs, command_time_limit); a /file append's write
    # (as root) is undone after command_time_limit without progress (mailflow's: Postfix's limit is for commands).
    default_privs: str = "nobody"
    command_time_limit: Duration = Field(1000.0, gt=0)
    allow_mail_to_files: tuple[Literal["alias", "forward", "include"], ...] = ("alias", "forward")
    # The mailbox, relative to the home: ending in "/" a Maildir, else an mbox file; "" = mail_spool_directory.
    home_mailbox: str = "Maildir/"
    # With home_mailbox "": <mail_spool_directory>/<user> is an mbox file (a Maildir when this ends in "/").
    mail_spool_directory: str = "var/spool/mail"
    # How an mbox file is locked, in this order (Postfix mailbox_delivery_lock).
    mailbox_delivery_lock: tuple[Literal["fcntl", "flock", "dotlock"], ...] = ("fcntl", "dotlock")
    # The largest an mbox file, a /file destination or a Maildir message file may grow, in bytes; 0 = no limit
    # (Postfix mailbox_size_limit). A delivery past it bounces 5.2.2.
    mailbox_size_limit: int = Field(51_200_000, ge=0)
    # After aliases and .forward, a mailbox goes (in this order of preference) to `transport:nexthop` (Postfix
    # mailbox_transport, e.g. "lmtp:unix:/run/dovecot/lmtp"; "" = the nexthop local was given), or is piped
    # into a command run as the user (mailbox_command, e.g. "/usr/lib/dovecot/dovecot-lda -f \"$SENDER\""),
    # or is written as home_mailbox says.
    mailbox_transport: str = ""
    mailbox_command: str = ""
    # A recipient that is no local user goes to `transport:nexthop` (fallback_transport), or is resent to the
    # address luser_relay names after $user, $local, $extension, $domain, $recipient... expansion; else it
    # bounces 5.1.1 unknown user.
    fallback_transport: str = ""
    luser_relay: str = ""

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

    @field_validator("mailbox_transport", "fallback_transport")
    @classmethod
    def _passes_to(cls, v: str) -> str:
        if v:
            check_transport(v)
        if v.partition(":")[0] == "local":
            raise ValueError(f"{v!r}: local would hand the mailbox to itself")
        return v

    @field_validator("luser_relay")
    @classmethod
    def _luser_relay(cls, v: str) -> str:
        check_local_macros(v)
        return v

    @field_validator("default_privs")
    @classmethod
    def _default_privs(cls, v: str) -> str:
        if not v.strip() or v == "root":
            raise ValueError(f"{v!r}: name an unprivileged user (not root)")
        return v


def check_bind_address(value: str, family: int) -> str:
    """smtp_bind_address (family 4) or smtp_bind_address6 (6): "" or a numerical address of that family, in
    brackets or not (as Postfix takes it); returned without the brackets."""
    address = value.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address:
        return ""
    ip = parse_ip(address)
    if ip is None or ip.version != family:
        raise ValueError(f"{value!r} is not an IPv{family} address")
    return str(ip)


# [smtp] and [lmtp]'s bind_address and bind_address6 (the same check for both clients)
BindAddress4 = Annotated[str, AfterValidator(lambda v: check_bind_address(v, 4))]
BindAddress6 = Annotated[str, AfterValidator(lambda v: check_bind_address(v, 6))]


class SmtpSettings(Section):
    """The SMTP client's settings (Postfix smtp): [smtp]'s, and what a `[smtp.services.NAME]` may set."""

    port: int = Field(25, ge=1, le=65535)
    connect_timeout: Duration = 30.0  # 0: the system's connect limit, none of mailflow's (as Postfix's)
    helo_timeout: Duration = Field(300.0, gt=0)
    command_timeout: Duration = Field(300.0, gt=0)
    data_timeout: Duration = Field(600.0, gt=0)
    # The reply to STARTTLS and the TLS handshake after it (smtp_starttls_timeout).
    starttls_timeout: Duration = Field(300.0, gt=0)
    # The name said in EHLO/HELO (smtp_helo_name); "" = myhostname.
    helo_name: str = ""
    # TLS (smtp_tls_*): the level, per-nexthop overrides, trust anchors ("" = the system's), client certificate.
    # dane / dane-only: the next hop's DNSSEC-validated TLSA records decide (docs/deliverability.md).
    tls_security_level: Literal["none", "may", "dane", "encrypt", "dane-only", "verify", "secure"] = "may"
    tls_policy_maps: TableSpecs = ()
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # What is logged of each TLS session (smtp_tls_loglevel): 0 failures only, 1 and above also the summary line
    # (`Verified TLS connection established to ...`); mailflow writes nothing more from 2 on.
    tls_loglevel: int = Field(0, ge=0, le=4)
    # AUTH to a relay (smtp_sasl_password_maps): "user:password" by MX host name or nexthop as written.
    sasl_password_maps: TableSpecs = ()
    sasl_tls_required: bool = True
    # smtp_sender_dependent_authentication: sasl_password_maps asked by the envelope sender first (user@domain,
    # @domain), and a connection reused only for mail from the same sender
    sender_dependent_authentication: bool = False
    # smtp_generic_maps: the addresses of outgoing mail (MAIL FROM, RCPT TO, the header's address fields) rewritten
    # on the wire, keyed as canonical maps (user@domain, @domain; e.g. "joe@box.local  joe@example.com")
    generic_maps: TableSpecs = ()
    # smtp_header_checks, smtp_mime_header_checks, smtp_nested_header_checks, smtp_body_checks: the content of
    # outgoing mail edited on the wire (the queue keeps it as it was). smtp(8)'s actions only: REPLACE, PREPEND,
    # IGNORE, WARN, INFO, DUNNO, OK (others logged and ignored). MIME headers go through mime_header_checks only.
    # The mime, nested and body checks are looked up on the event loop as the content streams: no sqlite: or unix:.
    header_checks: TableSpecs = ()
    mime_header_checks: InlineTableSpecs = ()
    nested_header_checks: InlineTableSpecs = ()
    body_checks: InlineTableSpecs = ()
    # smtp_reply_filter: each line of a server's reply rewritten by a table before it is parsed (a key is the line,
    # a value replaces it: `/^(250-)?PIPELINING$/ 250-X-NOPIPELINING` for a broken server). Use with care. No
    # sqlite: or unix: (looked up on the event loop for each reply line).
    reply_filter: InlineTableSpecs = ()
    # Connection cache (smtp_connection_cache_time_limit, smtp_connection_reuse_count/time_limit); 0s: off.
    connection_cache_time_limit: Duration = 2.0
    connection_reuse_count_limit: PostfixInt = Field(100, ge=0)
    connection_reuse_time_limit: Duration = Field(300.0, gt=0)
    # The source address of connections to IPv4 and IPv6 peers (smtp_bind_address, smtp_bind_address6); "": the
    # system's choice. A bind that fails is a warning and the connection goes from any address, or with
    # bind_address_enforce (smtp_bind_address_enforce) the peer fails: 4.4.0 "server configuration error".
    bind_address: BindAddress4 = ""
    bind_address6: BindAddress6 = ""
    bind_address_enforce: bool = False
    # smtp_fallback_relay: next hops ("[host]:port", "[address]", "host:port", "domain") tried in order for the
    # recipients a delivery could not deliver for a temporary reason or whose destination was not found; not for
    # a domain this server is an MX host of.
    fallback_relay: tuple[str, ...] = ()

    @field_validator("fallback_relay")
    @classmethod
    def _fallback_relay(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Each an SMTP next hop, as the client parses it (a list item "a, b" is refused: one next hop each)."""
        for relay in v:
            try:
                host, _ = parse_hostport(relay.strip(), 25)
            except ValueError:
                host = ""
            if not host.strip() or any(c in relay for c in ", \t"):
                raise ValueError(f"{relay!r} is not an SMTP next hop ([host]:port, [address], host:port, domain)")
        return v


S = TypeVar("S", bound=Section)


# The built-in transport an [smtp.services.NAME] may replace: `relay`, [smtp]'s own otherwise, is in Postfix's
# master.cf an smtp service of its own (`relay unix … smtp -o smtp_tls_security_level=encrypt`).
REPLACEABLE = {"smtp": ("relay",), "lmtp": ()}


def _merged(section: S, service: Section) -> S:
    """`section` with the keys `service` sets in place of its own, validated as the section is (its cross-key
    checks too), without services of its own."""
    return overlay(section, [service.model_dump(exclude_unset=True)], exclude={"services"})


def _check_merged(section: Section, services: Mapping[str, Section]) -> None:
    """Each service's merged settings validate: a problem names the service and its key."""
    for name, service in services.items():
        try:
            _merged(section, service)
        except ValidationError as e:
            err = e.errors()[0]
            raise NestedRefusal(f"services.{name}.{validation_key(err)}", validation_reason(err)) from None


class ClientServices(Section):
    """What [smtp] and [lmtp] share about their `services` (each class declares the field, its own service type):
    the names (a transport's, none of the built-in ones but the class's `replaceable`), a dump of the keys each
    service sets, the merged settings validated at load, and `for_service(NAME)`."""

    replaceable: ClassVar[tuple[str, ...]] = ()
    if TYPE_CHECKING:
        services: Mapping[str, Section]

    @field_validator("services", check_fields=False)
    @classmethod
    def _service_names(cls, services: dict[str, S]) -> dict[str, S]:
        return check_service_names(services, cls.replaceable)

    @field_serializer("services", check_fields=False)
    def _set_keys_only(self, services: Mapping[str, Section]) -> dict[str, dict[str, object]]:
        """A service as written (the keys it sets): dumped and validated again (a reload), it stays one."""
        return {name: service.model_dump(exclude_unset=True) for name, service in services.items()}

    @model_validator(mode="after")
    def _services_merge(self) -> Self:
        _check_merged(self, self.services)
        return self

    def for_service(self, name: str) -> Self:
        """The settings of the service `name`: these, with the keys it sets in their place."""
        return _merged(self, self.services[name])


class SmtpService(SmtpSettings):
    """One `[smtp.services.NAME]` (master.cf `NAME unix … smtp -o …`): the [smtp] keys it sets are its own."""


class SmtpConfig(SmtpSettings, ClientServices):
    """The SMTP client (Postfix smtp): relay and MX delivery; `services` are named SMTP client services, each a
    transport of its own name with [smtp]'s settings but the keys it sets."""

    replaceable: ClassVar[tuple[str, ...]] = REPLACEABLE["smtp"]
    services: dict[str, SmtpService] = {}

    @field_validator("tls_key_file")
    @classmethod
    def _key_needs_cert(cls, v: str, info: ValidationInfo) -> str:
        if v and not info.data.get("tls_cert_file"):
            raise ValueError("needs tls_cert_file (the certificate the key belongs to)")
        return v

    def key_source(self, transport: str, key: str) -> str:
        """The key the `key` value of a transport's SMTP client is set by: `smtp.services.NAME.KEY` when it is a
        service that sets it, else `smtp.KEY` (a value the service inherits, [smtp]'s own, relay's)."""
        service = self.services.get(transport)
        if service is not None and key in service.model_fields_set:
            return f"smtp.services.{transport}.{key}"
        return f"smtp.{key}"


class LmtpSettings(Section):
    """The LMTP client (Postfix lmtp): final delivery to a mailbox server such as Dovecot. `port` is used when the
    nexthop names none; each stage of the dialogue has its own limit (none of them may be 0 but connect_timeout's:
    0 leaves the connection to the system's limit, as Postfix's lmtp_connect_timeout 0 does)."""

    port: int = Field(24, ge=1, le=65535)
    connect_timeout: Duration = 30.0
    command_timeout: Duration = Field(300.0, gt=0)
    data_timeout: Duration = Field(600.0, gt=0)
    # As [smtp]'s (lmtp_bind_address, lmtp_bind_address6, lmtp_bind_address_enforce): TCP next hops only.
    bind_address: BindAddress4 = ""
    bind_address6: BindAddress6 = ""
    bind_address_enforce: bool = False
    # As [smtp]'s (lmtp_generic_maps: the addresses the LMTP client sends, as smtp.generic_maps maps them).
    generic_maps: TableSpecs = ()
    # As [smtp]'s (lmtp_header_checks, lmtp_mime_header_checks, lmtp_nested_header_checks, lmtp_body_checks).
    header_checks: TableSpecs = ()
    mime_header_checks: InlineTableSpecs = ()
    nested_header_checks: InlineTableSpecs = ()
    body_checks: InlineTableSpecs = ()
    # Connection cache, as [smtp]'s (lmtp_connection_cache_time_limit, lmtp_connection_reuse_count_limit and
    # lmtp_connection_reuse_time_limit, Postfix's defaults); connection_cache_time_limit = 0s: off, a session a message.
    connection_cache_time_limit: Duration = 2.0
    connection_reuse_count_limit: PostfixInt = Field(0, ge=0)
    connection_reuse_time_limit: Duration = Field(300.0, gt=0)


class LmtpService(LmtpSettings):
    """One `[lmtp.services.NAME]` (master.cf `NAME unix … lmtp -o …`): the [lmtp] keys it sets are its own."""


class LmtpConfig(LmtpSettings, ClientServices):
    """[lmtp]; `services` are named LMTP client services, each a transport of its own name (as [smtp]'s)."""

    replaceable: ClassVar[tuple[str, ...]] = REPLACEABLE["lmtp"]
    services: dict[str, LmtpService] = {}


class DnsConfig(Section):
    """Where MX and address lookups go: empty means the system's resolv.conf. Entries are 'ip' or 'ip:port'."""

    nameservers: tuple[str, ...] = ()
    timeout: Duration = 5.0
    tries: int = Field(2, ge=1)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        """Addresses (c-ares and dnspython take no names), with a port from 1 or not: "a" or ":70000" failed at
        the first lookup."""
        for entry in v:
            try:
                host, port = (entry, 53) if parse_ip(entry.strip()) else parse_hostport(entry, default_port=53)
            except ValueError:
                host, port = "", 0
            if not parse_ip(host.strip()) or not port:
                raise ValueError(f"{entry!r} is not a name server (ip, ip:port or [ipv6]:port)")
        return v


class PipeService(Section):
    """One `[pipe.NAME]` delivery service (a Postfix pipe(8) master.cf entry): transport_maps values `NAME:`
    send mail to it. See mailflow.pipe_argv for the macros and flags."""

    # The command, run without a shell; argv[0] an absolute path; ${recipient} etc. expand to single elements.
    argv: tuple[str, ...]
    # Run as this user (mailflow must be root to switch); "" = as mailflow runs, or `nobody` when it runs as root.
    user: str = ""
    time_limit: Duration = Field(1000.0, gt=0)
    # Bytes of command output kept for the diagnostic; the rest is read and dropped.
    output_limit: int = Field(2048, ge=1)
    # Postfix's pipe flags: B D F O R X h q u . >
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
        return check_flags(v)
