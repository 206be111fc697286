"""`Config`: the whole configuration, the top-level settings (Postfix main.cf names) and one field per section.

    Config                   frozen; `origin` (myorigin or myhostname), `domain`, `queue_path`; `for_probes()`
                             (the routing of address verification's probes); `defined_transports()`;
                             `smtp_client_of(transport)` (the SMTP client settings a transport name uses);
                             `smtp_clients()` (every SMTP client: name, where its settings are, the settings)
    DEFAULTS                 Config() as built in, relative paths as written: where a component's constructor
                             needs a default (for tests), it takes it from here rather than restating it
    BUILTIN_TRANSPORTS       the transport names a [pipe.NAME] or an [smtp.services.NAME] service may not take

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded by mailflow.config.load).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pydantic import (FieldSerializationInfo, Field, ModelWrapValidatorHandler, PrivateAttr, ValidationInfo,
                      field_serializer, field_validator, model_validator)

from mailflow.address import is_valid_domain, is_valid_hostname, mailbox_syntax_error, normalise_domain
from mailflow.config.accounts import AccountsConfig
from mailflow.config.admin import AdminConfig
from mailflow.config.base import (BUILTIN_TRANSPORTS, RELAY, Duration, Networks, PostfixInt, Relayhost, Section,
                                  TableSpecs, Transport, check_service_names, each_one_of)
from mailflow.config.filters import (PROBE_ROUTING, AddressVerifyConfig, ChecksConfig, ClamdConfig, GreylistConfig,
                                     MilterConfig, SenderAuthConfig, SpamdConfig)
from mailflow.config.delivery import DnsConfig, LmtpConfig, LocalConfig, PipeService, SmtpConfig
from mailflow.config.deliverability import ArcConfig, DeliverabilityConfig, DkimConfig, MtaStsConfig, SrsConfig
from mailflow.config.http import HttpConfig
from mailflow.config.log import LogConfig
from mailflow.config.queue import QueueConfig, SendmailConfig
from mailflow.config.sink import SinkConfig
from mailflow.config.smtpd import SmtpdConfig
from mailflow.config_source import QUEUE_DIRECTORY
from mailflow.syntax import is_ip_address
from mailflow.tables import check_spec
from mailflow.config.base import FILE_COMMENTS, keep_file_comments
from mailflow.tables.match_list import DOMAIN_LIST_SETTINGS, PatternFiles, domain_list_words


_DOTTED_DOMAIN = {
    False: "{entry}: this is an exact list (as Postfix's): a leading '.' would match no domain; "
           "list each domain, subdomains included",
    True: "{entry}: a relay_domains entry already matches its subdomains (Postfix "
          "parent_domain_matches_subdomains); write it without the leading '.'",
}

def _is_file(item: object) -> bool:
    """A domain list's `/file/name` entry (as Postfix's match_list tells it: a leading '/')."""
    return str(item).strip().startswith("/")


def _configured_entries(name: str, items: Iterable[object]) -> tuple[str, ...]:
    """A domain list as configured, each entry but a /file/name normalised (as a list without files is held)."""
    entries = [str(item).strip() for item in items if str(item).strip()]
    return tuple(entry if _is_file(entry) else _domain_entry(name, entry, "") for entry in entries)


def _domain_entry(name: str, entry: str, where: str) -> str:
    """One entry of the domain setting `name` (a word of a /file: `where` is its `FILE, line N`), normalised (lower
    case, IDNA A-labels), or a lookup table's spec where the list takes tables; ValueError saying why it is neither
    (a file's word is never quoted)."""
    marks = ".!" if name == "masquerade_domains" else ""
    tables = name in ("virtual_mailbox_domains", "virtual_alias_domains")
    shown = f"{where}: a word" if where else repr(entry)  # (a file's words are not echoed)
    if tables and ":" in entry:
        try:
            return check_spec(entry)
        except ValueError as e:
            raise ValueError(f"{where}: a word that is neither a domain name nor a lookup table mailflow takes"
                             if where else str(e)) from None
    if entry.startswith("!") and not marks:
        raise ValueError(f"{shown} is an exclusion ('!'): mailflow's domain lists have none")
    if entry.startswith(".") and name != "masquerade_domains":
        raise ValueError(_DOTTED_DOMAIN[name == "relay_domains"].format(entry=shown))
    mark = entry[0] if entry[0] in marks else ""
    normal = normalise_domain(entry[len(mark):])
    if not normal or not is_valid_domain(normal):
        raise ValueError(_not_a_domain(entry, shown, tables))
    return mark + normal


def _not_a_domain(entry: str, shown: str, tables: bool) -> str:
    """Why a domain list's entry (`shown` as the reason names it) is none, with what a Postfix main.cf habit meant
    (a table, $name) where it shows."""
    if entry.startswith("$"):
        return f"{shown} is not a domain name (there is no $name expansion: write the name itself)"
    if ":" in entry or "/" in entry:
        return (f"{shown} is not a domain name" + ("" if tables else " (this list takes domain names; lookup tables "
                "are taken by virtual_alias_domains and virtual_mailbox_domains)"))
    return f"{shown} is not a domain name"


# Postfix's smtputf8_autodetect_classes names (all taken, so that an imported main.cf loads; cleanup applies
# sendmail, smtpd and forward: see Cleanup's module doc and docs/config.md)
SMTPUTF8_AUTODETECT_CLASSES = ("sendmail", "smtpd", "qmqpd", "forward", "bounce", "notify", "verify", "all")
HEADER_CLIENT_RULES = ("permit_inet_interfaces", "permit_mynetworks", "permit_sasl_authenticated",
                       "permit_tls_clientcerts", "permit_tls_all_clientcerts")


class Config(Section):
    """The whole configuration. Section tables: smtpd, local, smtp, lmtp, dns, queue, log, sendmail, http, sink,
    accounts, dkim, arc, srs, mta_sts, deliverability, admin."""

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
    # site!user (an address without '@') is user@site, and user@site also when it is site!user@<a local domain>
    # (swap_bangpath, before the percent hack: `a!b%c` is `b%c@a`).
    swap_bangpath: bool = True
    mynetworks: Networks = ("127.0.0.0/8", "::1/128")
    relayhost: Relayhost = ""
    local_transport: Transport = "local"
    relay_transport: Transport = RELAY  # (Postfix's default: an smtp client service of its own, [smtp]'s settings)
    default_transport: Transport = "smtp"
    # Lookup tables (`type:name`, searched in order): transport:nexthop per address or domain, overriding
    # the class's transport; and the known recipients of relay_domains (empty: any recipient is accepted).
    transport_maps: TableSpecs = ()
    # relocated(5): a recipient (user@domain; user for a local domain; @domain) whose entry names where it went
    # bounces `5.1.6 User has moved to <value>` (smtpd refuses it at RCPT: 550), whatever its class or transport.
    relocated_maps: TableSpecs = ()
    relay_recipient_maps: TableSpecs = ()
    # Routing by envelope sender (Postfix's names), looked up as user+ext@domain, user@domain, @domain: a
    # relayhost for relay and default mail, and a transport[:nexthop] for default mail, in place of relayhost and
    # default_transport; DUNNO: no override. transport_maps overrule both. The null sender's key: `<>`.
    sender_dependent_relayhost_maps: TableSpecs = ()
    sender_dependent_default_transport_maps: TableSpecs = ()
    empty_address_relayhost_maps_lookup_key: str = Field("<>", min_length=1)
    empty_address_default_transport_maps_lookup_key: str = Field("<>", min_length=1)
    # Hosted domains whose users have mailboxes here but no local account (the virtual mailbox class):
    # virtual_mailbox_maps map user@domain (or @domain) to a Maildir path under virtual_mailbox_base,
    # ending in "/" (e.g. "example.com/alice/"); a recipient not in the maps gets 550 5.1.1 at RCPT.
    virtual_mailbox_domains: tuple[str, ...] = ()
    virtual_mailbox_maps: TableSpecs = ()
    virtual_mailbox_base: str = "var/vmail"
    virtual_transport: Transport = "virtual"
    # Who owns what the virtual transport creates (directories 0700, files 0600): the numeric uid and gid these
    # tables give for the recipient (Postfix virtual_uid_maps/virtual_gid_maps, e.g. "static:5000"); none:
    # mailflow's own. Giving files away needs root (or CAP_CHOWN); see docs/accounts.md.
    virtual_uid_maps: TableSpecs = ()
    virtual_gid_maps: TableSpecs = ()
    # Quota of a virtual mailbox: the bytes of its messages (new/ and cur/) plus the new one; 0: no limit.
    # virtual_mailbox_limit_maps give per-address limits (bytes). Over quota: bounce 5.2.2, or with
    # virtual_overquota_bounce = false defer 4.2.2 (the names of Postfix's VDA quota patch).
    virtual_mailbox_limit: int = Field(0, ge=0)
    virtual_mailbox_limit_maps: TableSpecs = ()
    virtual_overquota_bounce: bool = True
    # Local users (local_recipient_maps) and local aliases (alias_maps: aliases(5) files when texthash). A local
    # recipient is known when either table has its local part; empty local_recipient_maps: any is.
    local_recipient_maps: TableSpecs = ("inline:{postmaster=postmaster}",)
    alias_maps: TableSpecs = ()
    # Address rewriting in cleanup (canonical(5)): sender_/recipient_canonical_maps first, then canonical_maps.
    canonical_maps: TableSpecs = ()
    sender_canonical_maps: TableSpecs = ()
    recipient_canonical_maps: TableSpecs = ()
    # Envelope senders in a subdomain of these lose the subdomain (a.b.example.com -> example.com); an entry
    # "!host.example.com" keeps that one; masquerade_exceptions lists users never masqueraded.
    masquerade_domains: tuple[str, ...] = ()
    masquerade_exceptions: tuple[str, ...] = ()
    # Automatic BCC recipients in cleanup (postconf(5)), for mail from outside (smtpd, sendmail; not forwarded
    # copies, notices, nor a listener with no_address_mappings): sender_bcc_maps asked with the rewritten sender
    # (never the null sender), recipient_bcc_maps with each recipient after canonical mapping (before virtual
    # alias expansion), always_bcc for every message. One address each, added with NOTIFY=NEVER.
    always_bcc: str = ""
    sender_bcc_maps: TableSpecs = ()
    recipient_bcc_maps: TableSpecs = ()
    # virtual(5): virtual_alias_maps rewrite recipients of any domain to one or more addresses, recursively;
    # virtual_alias_domains are domains with aliases only (an address without an alias gets 550 5.1.1).
    virtual_alias_domains: tuple[str, ...] = ()
    virtual_alias_maps: TableSpecs = ()
    virtual_alias_recursion_limit: PostfixInt = Field(1000, ge=1)
    virtual_alias_expansion_limit: PostfixInt = Field(1000, ge=1)
    recipient_delimiter: str = "+"
    # Postfix allow_min_user: false refuses a sender or recipient beginning with '-' (smtpd: 501 5.1.7 / 5.1.3;
    # pipe and local bounce it), so that no address reaches a command's argv as an option.
    allow_min_user: bool = False
    # cleanup's limits on a message (Postfix names): hopcount_limit Received headers, this host's own counted,
    # is a mail loop (554 5.4.0, Postfix's reply); a header section larger than header_size_limit bytes is
    # refused (552 5.3.4).
    hopcount_limit: PostfixInt = Field(50, ge=1)
    header_size_limit: PostfixInt = Field(102400, ge=1024)
    # Postfix smtputf8_autodetect_classes: the mail whose header fields (the message's, a MIME part's, an
    # attached message's) cleanup reads for a byte that is not ASCII, and marks SMTPUTF8 when one has it (then a
    # peer without SMTPUTF8 gets no such message: 5.6.7). Postfix's names; the ones with no effect here are in
    # docs/config.md.
    smtputf8_autodetect_classes: tuple[str, ...] = ("sendmail", "verify")
    # Postfix message_drop_headers: header fields cleanup removes from every message it queues (names, any
    # case): a Bcc must never reach the recipients, and Return-Path and Content-Length are for the final hop.
    message_drop_headers: tuple[str, ...] = ("bcc", "content-length", "resent-bcc", "return-path")
    # Which SMTP clients' mail gets the headers it lacks (Message-ID, Date, From), as Postfix 2.6+ decides it:
    # local_header_rewrite_clients (permit_inet_interfaces: a client on this host; permit_mynetworks;
    # permit_sasl_authenticated; permit_tls_clientcerts, permit_tls_all_clientcerts). Other clients' mail is
    # passed on as it came (a header added to it can break a DKIM signature that covers the header's absence),
    # unless always_add_missing_headers. Mail submitted with sendmail always gets them.
    local_header_rewrite_clients: tuple[str, ...] = ("permit_inet_interfaces",)
    # The same clients' header addresses are rewritten as their envelope's are (an unqualified address gets
    # @myorigin; canonical maps, masquerading). Other clients' header addresses are left alone, unless this names
    # a domain: theirs are then rewritten too, unqualified ones getting @this domain (Postfix's names).
    remote_header_rewrite_domain: str = ""
    always_add_missing_headers: bool = False
    queue_directory: str = QUEUE_DIRECTORY
    # Postfix soft_bounce, the safety net while testing a configuration: mail that would bounce is deferred
    # instead (logged `status=SOFTBOUNCE`, its status made 4.X.X), and every 5xx reply smtpd gives becomes 4xx.
    # Mail still goes back to its sender when it outlives maximal_queue_lifetime, as in Postfix.
    soft_bounce: bool = False
    # How long a stopping server (SIGTERM: `docker stop`, systemd, Kubernetes) lets the transactions of open
    # sessions and the deliveries in flight finish before it cuts them off; keep it below the supervisor's own
    # grace period (docker stop's is 10 s), or the supervisor kills the process first.
    shutdown_grace: Duration = Field(8.0, ge=0)

    smtpd: SmtpdConfig = SmtpdConfig()
    local: LocalConfig = LocalConfig()
    smtp: SmtpConfig = SmtpConfig()
    lmtp: LmtpConfig = LmtpConfig()
    dns: DnsConfig = DnsConfig()
    queue: QueueConfig = QueueConfig()
    log: LogConfig = LogConfig()
    sendmail: SendmailConfig = SendmailConfig()
    http: HttpConfig = HttpConfig()
    sink: SinkConfig = SinkConfig()
    admin: AdminConfig = AdminConfig()
    accounts: AccountsConfig = AccountsConfig()
    # Deliverability (docs/deliverability.md): DKIM signing, ARC, SRS, MTA-STS, what dns-records publishes.
    dkim: DkimConfig = DkimConfig()
    arc: ArcConfig = ArcConfig()
    srs: SrsConfig = SrsConfig()
    mta_sts: MtaStsConfig = MtaStsConfig()
    deliverability: DeliverabilityConfig = DeliverabilityConfig()
    # Inbound filtering (docs/filtering.md), every layer off by default.
    checks: ChecksConfig = ChecksConfig()
    milter: MilterConfig = MilterConfig()
    spamd: SpamdConfig = SpamdConfig()
    clamd: ClamdConfig = ClamdConfig()
    greylist: GreylistConfig = GreylistConfig()
    address_verify: AddressVerifyConfig = AddressVerifyConfig()
    sender_auth: SenderAuthConfig = SenderAuthConfig()
    # Delivery to commands: [pipe.NAME] tables (PipeService), each a transport named NAME.
    pipe: dict[str, PipeService] = {}
    # The directory relative paths were taken from (None: as written); set by resolve_paths.
    _base: Path | None = PrivateAttr(None)
    # The domain lists naming a /file/name: setting -> (the field's value, the list as configured: its /file paths,
    # its other entries normalised). The field holds the file's words (read at validation); model_dump and `config
    # show` give the list as configured, so that a configuration re-validated (a reload) reads the file again, while
    # the field still holds those words (a model_copy that changes it drops the pair's use: the field is dumped).
    _as_configured: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = PrivateAttr(default_factory=dict)
    # The comments that ended a line of a list's /file (`KEY: FILE, line N: …`): warnings(), as Postfix 3.7 warns.
    _file_comments: tuple[str, ...] = PrivateAttr(())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_domain_files(cls, data: object, handler: ModelWrapValidatorHandler["Config"],
                           info: ValidationInfo) -> "Config":
        config = handler(data)
        config._file_comments = tuple((info.context or {}).get(FILE_COMMENTS, ()))
        if isinstance(data, dict):
            config._as_configured = {
                name: (getattr(config, name), _configured_entries(name, data[name])) for name in DOMAIN_LIST_SETTINGS
                if isinstance(data.get(name), (list, tuple)) and any(_is_file(item) for item in data[name])}
        elif isinstance(data, Config):
            config._as_configured = dict(data._as_configured)
            config._file_comments = data._file_comments
        return config

    @field_serializer(*DOMAIN_LIST_SETTINGS)
    def _domain_list_as_configured(self, value: tuple[str, ...], info: FieldSerializationInfo) -> tuple[str, ...]:
        """The list as configured (its /file paths), unless the field changed since, or the caller asks for the
        effective values (context {"effective": True}: the file's words, as the tables check needs them)."""
        field_value, configured = self._as_configured.get(info.field_name, (None, value))
        if field_value is None or (info.context or {}).get("effective"):
            return value
        return configured if field_value is value or field_value == value else value

    @model_validator(mode="after")
    def _local_passes_to_a_transport(self) -> "Config":
        """local.mailbox_transport and local.fallback_transport name a built-in transport or a service."""
        known = self.defined_transports() - {"local", "capture"}
        for key in ("mailbox_transport", "fallback_transport"):
            name = getattr(self.local, key).partition(":")[0]
            if name and name not in known:
                raise ValueError(f"local.{key}: {name!r} is not a transport (known: {', '.join(sorted(known))})")
        return self

    @model_validator(mode="after")
    def _queue_tables_name_transports(self) -> "Config":
        """The per-transport tables of [queue] name a built-in transport or a service ([pipe.NAME],
        [smtp.services.NAME], [lmtp.services.NAME]): a misspelt one would be ignored without a word (Postfix warns
        of a setting nobody reads)."""
        known = self.defined_transports()
        for key in ("transport_concurrency_limit", "transport_destination_rate_delay",
                    "transport_destination_recipient_limit"):
            unknown = sorted(set(getattr(self.queue, key)) - known)
            if unknown:
                raise ValueError(f"queue.{key}: {', '.join(map(repr, unknown))} is not a transport "
                                 f"(known: {', '.join(sorted(known))})")
        return self

    @model_validator(mode="after")
    def _one_service_a_name(self) -> "Config":
        """A name is one service's: a [pipe.NAME], an [smtp.services.NAME] or an [lmtp.services.NAME] (each is the
        transport of that name), as a master.cf service name is one line's."""
        seen: dict[str, str] = {}  # (a service named as a built-in transport is refused by its section)
        for where, names in self._services():
            for name in names:
                if name in seen:
                    raise ValueError(f"{where}.{name}: {name!r} is also [{seen[name]}.{name}] (a service's name is the "
                                     "transport's: one service each)")
                seen[name] = where
        return self

    def _services(self) -> list[tuple[str, list[str]]]:
        return [("pipe", list(self.pipe)), ("smtp.services", list(self.smtp.services)),
                ("lmtp.services", list(self.lmtp.services))]

    def smtp_client_of(self, transport: str) -> tuple[str, SmtpConfig] | None:
        """(where its settings are, the settings) of the SMTP client a transport name stands for: an
        [smtp.services.NAME] (`relay` too when it is one), else [smtp] for smtp and relay; None for another."""
        if transport in self.smtp.services:
            return f"smtp.services.{transport}", self.smtp.for_service(transport)
        return ("smtp", self.smtp) if transport in ("smtp", RELAY) else None

    def smtp_clients(self) -> list[tuple[str, str, SmtpConfig]]:
        """(transport name, where its settings are, the settings) of every SMTP client the server runs: smtp, relay
        ([smtp]'s settings under its own name unless an [smtp.services.relay] takes its place), each
        [smtp.services.NAME]; each a client of its own (its own sessions and cache), as smtp_client_of says."""
        names = dict.fromkeys(("smtp", RELAY, *self.smtp.services))
        return [(name, *client) for name in names if (client := self.smtp_client_of(name)) is not None]

    def defined_transports(self) -> set[str]:
        """Every transport name this configuration defines: the built-in ones and its services'."""
        return set(BUILTIN_TRANSPORTS).union(*(names for _, names in self._services()))

    @field_validator("pipe")
    @classmethod
    def _pipe_names(cls, v: dict[str, PipeService]) -> dict[str, PipeService]:
        return check_service_names(v)

    @field_validator("mydestination", "relay_domains", "virtual_mailbox_domains", "virtual_alias_domains",
                     "masquerade_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        """Domains are stored normalised (lower case, IDNA A-labels); masquerade_domains also take
        "!host.example.com" (an exception). A ".example.com" entry is refused where Postfix would match it
        against nothing: mydestination and the virtual domain lists are exact lists, and a relay_domains
        entry already covers its subdomains. The virtual domain lists also take lookup tables (`type:name`,
        e.g. the account database's `accounts:PATH#domains`), as Postfix's do. An entry `/file/name` of the four
        lists that are Postfix match lists (DOMAIN_LIST_SETTINGS) is the words of the file, read here: at start,
        at each reload, at `config check` (mailflow.tables.match_list); not at sendmail's load (context
        read_domain_files false: the path is kept, the list unused)."""
        name = info.field_name or ""
        entries = [d.strip() for d in v if d.strip()]
        if name not in DOMAIN_LIST_SETTINGS:
            return tuple(_domain_entry(name, entry, "") for entry in entries)
        if not (info.context or {}).get("read_domain_files", True):
            return _configured_entries(name, entries)
        files = PatternFiles()
        words = domain_list_words(name, entries, files)
        keep_file_comments(info, files)
        return tuple(_domain_entry(name, entry, where) for entry, where in words)

    @field_validator("always_bcc")
    @classmethod
    def _always_bcc(cls, v: str) -> str:
        """One address, `user@domain` or `user` (cleanup adds @myorigin), or "" for none."""
        problem = None
        if "@" in v:
            problem = mailbox_syntax_error(v)
        elif v and (not v.isprintable() or any(c in v for c in " ,<>")):
            problem = "not one address"
        if problem:
            raise ValueError(f"{v!r} is not an address ({problem})")
        return v

    @field_validator("smtputf8_autodetect_classes")
    @classmethod
    def _autodetect_classes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return each_one_of(v, SMTPUTF8_AUTODETECT_CLASSES)

    @field_validator("local_header_rewrite_clients")
    @classmethod
    def _header_clients(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return each_one_of(v, HEADER_CLIENT_RULES)

    @field_validator("proxy_interfaces")
    @classmethod
    def _interfaces(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not is_ip_address(item.strip("[]")):
                raise ValueError(f"{item!r} is not an IP address")
        return v

    @field_validator("myhostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        """As Postfix's valid_hostname takes it (else `postfix` refuses to start): it is said in EHLO, Received and
        Message-ID."""
        if not is_valid_hostname(v):
            raise ValueError(f"{v!r} is not a host name (letters, digits, '-' and '_' in labels separated by dots, "
                             "not all digits)")
        return v

    @field_validator("myorigin", "mydomain", "remote_header_rewrite_domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        normal = normalise_domain(v) if v else v
        if v and not (normal and is_valid_domain(normal)):
            raise ValueError(f"{v!r} is not a domain name")
        return normal

    @property
    def queue_path(self) -> Path:
        return Path(self.queue_directory)

    @property
    def accounts_path(self) -> Path:
        """The account database: `[accounts] database_file`, else `<queue_directory>/accounts.db`."""
        return Path(self.accounts.database_file) if self.accounts.database_file else self.queue_path / "accounts.db"

    def for_probes(self) -> "Config":
        """The configuration address verification routes its probes by: [address_verify]'s PROBE_ROUTING
        settings in place of the main ones where set (Postfix's address_verify_relayhost, _transport_maps,
        _*_transport, read by trivial-rewrite's verify service); itself when none is."""
        probes = self.address_verify
        update = {key: getattr(probes, key) for key in PROBE_ROUTING if getattr(probes, key)}
        return self.model_copy(update=update) if update else self

    @property
    def origin(self) -> str:
        """myorigin, defaulting to myhostname."""
        return self.myorigin or self.myhostname

    def warnings(self) -> list[str]:
        """What is taken but likely not meant: origin_warning, settings that have no effect (each `key: reason`)."""
        origin = self.origin_warning()
        return ([origin] if origin else []) + self.smtpd.listener_warnings() + list(self._file_comments)

    def origin_warning(self) -> str | None:
        """The warning for a myorigin (or myhostname) that is not in mydestination while local(8)'s expansion is in
        use (the local transport delivers for mydestination, so users' .forward files are read, or alias_maps are
        set): unqualified names there (`bob`, `\\bob`) are qualified with it and leave this host, as Postfix's local
        sends them (docs/config.md, "Upgrading: `\\user`"). None when all is well."""
        expanding = self.local_transport.partition(":")[0] == "local" and bool(self.mydestination or self.alias_maps)
        origin = normalise_domain(self.origin)
        if not expanding or origin in self.mydestination:
            return None
        which = "myorigin" if self.myorigin else "myorigin (myhostname)"
        return (f"{which} {origin!r} is not in mydestination: unqualified names in aliases and .forward files "
                f"(`bob`, `\\bob`) go to NAME@{origin}, which is not delivered here; add {origin} to mydestination "
                "or set myorigin to a local domain (docs/config.md, \"Upgrading: \\user\")")

    @property
    def domain(self) -> str:
        """mydomain, defaulting to myhostname without its first label (myhostname itself if it has one)."""
        if self.mydomain:
            return self.mydomain
        first, dot, rest = self.myhostname.partition(".")
        return rest if dot and rest else self.myhostname


DEFAULTS = Config()
