"""TLS for the SMTP client: the policy per next hop, the SSL contexts, and certificate name matching.

Owns what Postfix's smtp_tls_security_level / smtp_tls_policy_maps / smtp_tls_*_cert_match decide; no I/O
except reading the CA and client certificate files, once, when a context is first needed.

    TlsPolicy(level, match, tlsa, mx_patterns, testing, source)   what one destination (or peer) requires
    policy_keys(nexthop_as_written, host)       the smtp_tls_policy_maps lookup keys, in order
    parse_policy(value) -> TlsPolicy            a table value; raises ValueError for an unusable one
    default_policy(level) -> TlsPolicy          the main.cf setting as a policy
    without_dane(level) -> TlsPolicy            what dane falls back to without TLSA records nor MTA-STS (may)
    TlsContexts(ca_file, cert_file, key_file)   .for_level(level) -> SSLContext; raises TlsUnavailable
    certificate_names(peercert) -> (dns, ip)    the names a certificate carries (SAN, else the CN)
    der_names(der) -> [dns]                     the DNS names of a DER certificate (one that was not verified)
    certificate_matches(peercert, patterns, hostname, nexthop) -> bool
    mismatch_error(patterns, hostname, nexthop) -> (62, "hostname mismatch") or (64, "IP address mismatch")
                                                the OpenSSL error Postfix logs for a certificate without the name

Levels (increasing, Postfix's order): none, may (unverified, plaintext on a failed handshake), dane (DANE when the
peer has usable DNSSEC-validated TLSA records, else may: see smtp.dane), encrypt (TLS required, unverified),
dane-only (DANE or no delivery), verify (trusted chain and a name match, by default the MX host name: `hostname`),
secure (trusted chain, by default the next-hop domain or a subdomain: `nexthop:dot-nexthop`). A policy that DANE
resolved for one peer carries its `tlsa` records: the peer's certificate must match one of them (smtp.dane). An
MTA-STS policy in enforce mode is `verify` with `mx_patterns` (the MX hosts it allows, smtp.mtasts); in testing
mode, the level stays and `testing` says to log what enforce would have refused. A `[host]` next hop
has no MX lookup, so its `hostname` is the host itself. `match=` patterns, separated by colons: `hostname`,
`nexthop`, `dot-nexthop`, a name (`mx.example.com`) or a suffix (`.example.com`: subdomains only).
Certificate wildcards (`*.example.com`) stand for exactly one label. The fingerprint level and the
ciphers/protocols/exclude attributes are not supported: such a value raises ValueError ("client TLS configuration
problem"), never a silent downgrade.
"""
from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass

from cryptography import x509

from mailflow.dns import Tlsa, is_ip_literal
from mailflow.files import TEXT_LIMIT, check_regular_file

LEVELS = ("none", "may", "dane", "encrypt", "dane-only", "verify", "secure")
DANE_LEVELS = ("dane", "dane-only")
DEFAULT_MATCH = {"verify": ("hostname",), "secure": ("nexthop", "dot-nexthop")}
_SEPARATORS = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class TlsPolicy:
    level: str
    match: tuple[str, ...] = ()
    tlsa: tuple[Tlsa, ...] = ()  # DANE, resolved for one peer: the certificate must match one of these
    mx_patterns: tuple[str, ...] | None = None  # MTA-STS: the MX hosts the policy allows (None: any)
    testing: bool = False  # MTA-STS testing: log what enforce would refuse, deliver as the level says
    source: str = ""  # where the policy came from, as `mailflow address` and the log say it

    @property
    def required(self) -> bool:
        """TLS or no delivery to that peer (encrypt and above, a DANE peer)."""
        return LEVELS.index(self.level) >= LEVELS.index("encrypt") or bool(self.tlsa)

    @property
    def verifies(self) -> bool:
        """The certificate must be trusted and name the peer (verify, secure)."""
        return self.level in ("verify", "secure")

    @property
    def dane(self) -> bool:
        """TLSA records are to be looked up for each peer (dane, dane-only)."""
        return self.level in DANE_LEVELS

    def describe(self) -> str:
        """One line: the level, what it checks, and where it came from."""
        words = [self.level]
        if self.match and self.verifies:
            words.append("match=" + ":".join(self.match))
        if self.mx_patterns is not None:
            words.append("mx=" + ",".join(self.mx_patterns))
        if self.tlsa:
            words.append(f"{len(self.tlsa)} TLSA record{'s' if len(self.tlsa) > 1 else ''}")
        if self.testing:
            words.append("(MTA-STS testing: failures are logged)")
        return " ".join(words) + (f" ({self.source})" if self.source else "")


class TlsUnavailable(Exception):
    """A context could not be built (unreadable CA or client certificate file)."""


def default_policy(level: str, source: str = "") -> TlsPolicy:
    return TlsPolicy(level, DEFAULT_MATCH.get(level, ()), source=source)


def without_dane(level: str) -> TlsPolicy:
    """What dane becomes for a peer without usable TLSA records, when no MTA-STS policy stands in: may."""
    return default_policy("may", f"{level}: no TLSA records")


def policy_keys(nexthop: str, host: str) -> list[str]:
    """The full next hop as written (brackets and port included); for a bare domain also each parent as
    `.parent.domain`, like transport(5)."""
    written = nexthop.strip().lower()
    if written.startswith("[") or ":" in written:
        return [written]
    labels = host.split(".")
    return [host] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def parse_policy(value: str) -> TlsPolicy:
    """`level [match=a:b] ...` → TlsPolicy. Raises ValueError naming what is wrong."""
    words = [w for w in _SEPARATORS.split(value.strip()) if w]
    if not words:
        raise ValueError("empty TLS policy")
    level = words[0].lower()
    if level not in LEVELS:
        raise ValueError(f"unsupported TLS security level {words[0]!r} (mailflow has {', '.join(LEVELS)})")
    match: list[str] = []
    for attribute in words[1:]:
        name, equals, setting = attribute.partition("=")
        if name.lower() != "match" or not equals:
            raise ValueError(f"unsupported TLS policy attribute {attribute!r} (mailflow has match=)")
        if level not in DEFAULT_MATCH:
            raise ValueError(f"match= needs level verify or secure, not {level}")
        match += [p.lower() for p in setting.split(":") if p]
    return TlsPolicy(level, tuple(match) or DEFAULT_MATCH.get(level, ()))


# ---------------------------------------------------------------------------------------------------- contexts


class TlsContexts:
    """The two client contexts, built on first use: unverified (may, encrypt) and verifying (verify, secure).
    Chain validation is the SSL library's; name matching is ours (check_hostname off), since a policy may
    accept several names."""

    def __init__(self, ca_file: str = "", cert_file: str = "", key_file: str = ""):
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._contexts: dict[bool, ssl.SSLContext] = {}

    def for_level(self, level: str) -> ssl.SSLContext:
        """Verifying for verify and secure; unverified for the others (DANE checks the certificate itself)."""
        verifying = level in ("verify", "secure")
        if verifying not in self._contexts:
            self._contexts[verifying] = self._build(verifying)
        return self._contexts[verifying]

    def _build(self, verifying: bool) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        try:
            for path in filter(None, (self._ca_file if verifying else "", self._cert_file, self._key_file)):
                check_regular_file(path, TEXT_LIMIT)  # OpenSSL opens them by name: a FIFO would hold the loop
            if verifying:
                context.verify_mode = ssl.CERT_REQUIRED
                if self._ca_file:
                    context.load_verify_locations(cafile=self._ca_file)
                else:
                    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                context.verify_mode = ssl.CERT_NONE
            if self._cert_file:
                context.load_cert_chain(self._cert_file, keyfile=self._key_file or None)
        except (OSError, ssl.SSLError) as e:
            raise TlsUnavailable(str(e)) from None
        return context


# ---------------------------------------------------------------------------------------------------- names


def certificate_names(peercert: dict) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate: its subjectAltName entries; without DNS entries, the CN."""
    dns = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    ips = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "IP Address"]
    if not dns:
        dns = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return [normal(n) for n in dns], [normal(ip) for ip in ips]


def der_names(der: bytes) -> list[str]:
    """subjectAltName DNS names, else the CN, of a DER certificate; [] when it cannot be read."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError:
        return []
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [normal(n) for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        return [normal(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
                if isinstance(a.value, str)]


def certificate_matches(peercert: dict, patterns: tuple[str, ...], hostname: str, nexthop: str) -> bool:
    """Does the certificate carry a name the patterns accept? `hostname` is the MX host (or the [host]),
    `nexthop` the next-hop domain before any MX lookup."""
    dns, ips = certificate_names(peercert)
    for wanted, suffix in _wanted_names(patterns, hostname, nexthop):
        if is_ip_literal(wanted):
            if not suffix and any(same_ip(wanted, ip) for ip in ips):
                return True
        elif any(name_matches(name, wanted, suffix) for name in dns):
            return True
    return False


HOSTNAME_MISMATCH = (62, "hostname mismatch")  # X509_V_ERR_HOSTNAME_MISMATCH and its text
IP_ADDRESS_MISMATCH = (64, "IP address mismatch")  # X509_V_ERR_IP_ADDRESS_MISMATCH


def mismatch_error(patterns: tuple[str, ...], hostname: str, nexthop: str) -> tuple[int, str]:
    """OpenSSL's verification error for a certificate that `certificate_matches` refused, as Postfix (whose
    names OpenSSL checks) logs it: X509_V_ERR_IP_ADDRESS_MISMATCH when every name asked for is an IP address,
    else X509_V_ERR_HOSTNAME_MISMATCH."""
    if all(is_ip_literal(wanted) for wanted, _ in _wanted_names(patterns, hostname, nexthop)):
        return IP_ADDRESS_MISMATCH
    return HOSTNAME_MISMATCH


def _wanted_names(patterns: tuple[str, ...], hostname: str, nexthop: str) -> list[tuple[str, bool]]:
    """(name, subdomains only) for each match pattern."""
    wanted = []
    for pattern in patterns:
        if pattern == "hostname":
            name, suffix = hostname, False
        elif pattern == "nexthop":
            name, suffix = nexthop, False
        elif pattern == "dot-nexthop":
            name, suffix = nexthop, True
        elif pattern.startswith("."):
            name, suffix = pattern[1:], True
        else:
            name, suffix = pattern, False
        wanted.append((normal(name), suffix))
    return wanted


def name_matches(cert_name: str, wanted: str, subdomains: bool) -> bool:
    """`cert_name` (maybe `*.x`) against `wanted`, or with `subdomains` against any name below `wanted`."""
    wildcard = cert_name.startswith("*.")
    base = cert_name[2:] if wildcard else cert_name
    if subdomains:
        return base.endswith("." + wanted) or (wildcard and base == wanted)
    if not wildcard:
        return cert_name == wanted
    first, dot, rest = wanted.partition(".")
    return bool(first and dot) and rest == base


def normal(name: str) -> str:
    return name.strip().rstrip(".").lower()


def same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False
