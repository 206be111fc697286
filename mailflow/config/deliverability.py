"""The deliverability sections: `[dkim]` (signing, OpenDKIM's tables), `[arc]` (sealing forwarded mail), `[srs]`
(sender rewriting for forwarded mail), `[mta_sts]` (the receiver's published TLS policy) and `[deliverability]`
(what `mailflow dns-records` and `check-deliverability` take as this host's public face). docs/deliverability.md.

    DkimConfig, ArcConfig, SrsConfig, MtaStsConfig, DeliverabilityConfig
    opendkim_dataset(value) -> (kind, path)     "refile:PATH" -> ("refile", PATH); "file:PATH" or "PATH" ->
                                                ("file", PATH)

Everything here is off by default: no signing table, no ARC, no SRS, no MTA-STS; DANE is a level of
`smtp.tls_security_level` (delivery.py).

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded): a signing table without a key
table (a key table alone serves ARC), an unknown OpenDKIM dataset type, ARC without a key, SRS without a secret file or
domain.
"""
from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from mailflow.address import normalise_domain
from mailflow.config.base import Duration, Section
from mailflow.syntax import is_ip_address

DATASET_KINDS = ("file", "refile")


def opendkim_dataset(value: str) -> tuple[str, str]:
    """OpenDKIM's data set syntax, as far as files go: `refile:PATH` (patterns, in order), `file:PATH` or a bare
    absolute/relative PATH (exact keys). Raises ValueError for another type (db:, dsn:, ldap:, ...)."""
    kind, colon, path = value.partition(":")
    if not colon or "/" in kind:
        return "file", value
    if kind not in DATASET_KINDS:
        raise ValueError(f"{value!r}: mailflow reads OpenDKIM data sets of type file: and refile: only")
    if not path.strip():
        raise ValueError(f"{value!r} names no file")
    return kind, path.strip()


class DkimConfig(Section):
    """DKIM signing (OpenDKIM as a milter): messages from this host's own users (authenticated submission, local
    submission, clients in mynetworks, notices made here) are signed with the key the signing table picks for
    the From address; "" = no signing."""

    # OpenDKIM SigningTable: "refile:PATH" (`*@example.com keyname`, first match wins) or "file:PATH" / "PATH"
    # (user@domain, domain, user@.parent, .parent, user@*, * in that order).
    signing_table: str = ""
    # OpenDKIM KeyTable: `keyname domain:selector:/path/to/private.key` (RSA PEM or an Ed25519 seed).
    key_table: str = Field("", validate_default=True)
    # Also sign mail this host forwards (aliases, .forward, virtual aliases to remote domains), with the key
    # the signing table gives the forwarding envelope sender (its SRS address when [srs] is on).
    sign_forwarded: bool = False

    @field_validator("signing_table", "key_table")
    @classmethod
    def _dataset(cls, v: str) -> str:
        if v:
            opendkim_dataset(v)
        return v

    @field_validator("key_table")
    @classmethod
    def _keys_for_table(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("signing_table") and not v:
            raise ValueError("a signing_table needs a key_table (the keys its entries name)")
        return v


class ArcConfig(Section):
    """ARC sealing (RFC 8617) of the mail this host forwards; off by default."""

    enabled: bool = False
    # The key, by its name in dkim.key_table (ARC seals with RSA only: dkimpy's arc_sign).
    key: str = Field("", validate_default=True)
    # The authserv-id of the Authentication-Results this host writes; "" = myhostname.
    authserv_id: str = ""

    @field_validator("key")
    @classmethod
    def _key(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("enabled") and not v:
            raise ValueError("ARC sealing needs a key (a name in dkim.key_table)")
        return v


class SrsConfig(Section):
    """Sender Rewriting Scheme for forwarded mail (postsrsd): a forwarded message's sender from another domain
    becomes `SRS0=HASH=TT=domain=user@<domain>`, and mail to such an address (a bounce) goes back to the original
    sender. Off by default."""

    enabled: bool = False
    # The domain of the rewritten senders (one of this host's domains, with SPF for the outbound address).
    domain: str = Field("", validate_default=True)
    # One secret per line: the first signs, every one verifies (rotate by adding a new first line).
    secret_file: str = Field("", validate_default=True)
    # A rewritten address older than this is refused when it comes back (550 5.1.1).
    max_age: Duration = Field(21 * 86400.0, gt=86400)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str, info: ValidationInfo) -> str:
        if v and not normalise_domain(v):
            raise ValueError(f"{v!r} is not a domain name")
        if info.data.get("enabled") and not v:
            raise ValueError("SRS needs a domain (one of this host's domains)")
        return normalise_domain(v) if v else v

    @field_validator("secret_file")
    @classmethod
    def _secret(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("enabled") and not v:
            raise ValueError("SRS needs a secret_file (one secret per line)")
        return v


class MtaStsConfig(Section):
    """MTA-STS (RFC 8461) for outbound mail: a destination's `_mta-sts` TXT record and HTTPS policy decide its TLS
    (enforce: verified TLS to a listed MX or defer 4.7.5; testing: logged only). Off by default."""

    enabled: bool = False
    # The HTTPS policy fetch, as a whole (connect, TLS, request, reply).
    fetch_timeout: Duration = Field(10.0, gt=0)
    # Policies kept in memory (least recently used go first).
    cache_size: int = Field(1000, ge=1)


class DeliverabilityConfig(Section):
    """What `mailflow dns-records` and `mailflow check-deliverability` take as this host's public face."""

    # The public IP addresses mail leaves from (SPF, PTR); empty: the listener addresses that are public.
    outbound_addresses: tuple[str, ...] = ()
    # Where DMARC aggregate reports and TLS-RPT reports go; "" = postmaster@DOMAIN.
    report_address: str = ""
    # The MTA-STS mode `dns-records` proposes for this host's domains.
    mta_sts_mode: str = "testing"

    @field_validator("outbound_addresses")
    @classmethod
    def _addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if not is_ip_address(item):
                raise ValueError(f"{item!r} is not an IP address")
        return v

    @field_validator("mta_sts_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("enforce", "testing", "none"):
            raise ValueError(f"{v!r}: MTA-STS modes are enforce, testing and none")
        return v
