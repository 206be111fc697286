"""The deliverability commands: `mailflow dkim keygen`, `mailflow dns-records`, `mailflow check-deliverability`, and
the TLS policy line of `mailflow address`. Each is a plain function; `mailflow.cli` registers them.

    dkim_keygen(domain, selector, algorithm, bits, output)   writes the key (0600, never over an existing file) and
                             prints its TXT record, then the KeyTable and SigningTable lines on stderr; exit 1 when
                             the file exists or cannot be written
    dns_records(domain, config)          the records to publish (mailflow.deliverability.records), zone file syntax
    check_deliverability(domain, config) one `PASS|WARN|FAIL point: text` line per point (and `  -> advice`); exit 1
                             when any point fails (mailflow.deliverability.check); DOMAIN defaults to mydomain
    tls_steps(config, steps) -> steps    `mailflow address`: after each smtp/relay (or SMTP client service) next hop, a
                             `tls` step naming the policy a delivery would use now (MTA-STS asks DNS and the policy
                             host when it is on), as that transport's settings give it

The signing, DNS and TLS modules are imported inside the commands: `sendmail`, which every script runs, must not
load them. Failure behaviour: configuration problems through `common.fail_config`; never a traceback. A DOMAIN that
is no domain name, a selector that is no DKIM selector and an RSA size outside 1024-4096 bits (the sizes RFC 8301
has every verifier take; a bigger key took minutes to make) are usage errors (exit 2), before any key is made.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import typer

from mailflow.address import is_valid_domain, normalise_domain
from mailflow.cli.common import ConfigOption, config_name, config_path, fail, fail_config, load
from mailflow.config import Config
from mailflow.errors import ConfigError
from mailflow.syntax import is_hostname

def dkim_keygen(domain: str = typer.Argument(..., help="the signing domain (d=)"),
                selector: str = typer.Argument(..., help="the selector (s=)"),
                algorithm: str = typer.Option("rsa", "--algorithm", "-a", help="rsa or ed25519"),
                bits: int = typer.Option(2048, "--bits", "-b", min=1024, max=4096, help="RSA key size"),
                output: Optional[str] = typer.Option(None, "--output", "-o",
                                                     help="the key file (default: SELECTOR.private)")) -> None:
    """Make a DKIM key (like opendkim-genkey): the private key file (mode 0600) and, on stdout, its TXT record."""
    from mailflow.signing import keygen
    from mailflow.signing.keytables import SigningKey, load_private_key

    domain = mail_domain("mailflow dkim keygen", domain)
    if not is_hostname(selector) or selector.endswith("."):
        fail("mailflow dkim keygen", f"{selector!r} is not a DKIM selector (letters, digits and '-' in labels "
                                     "separated by dots)", 2)
    path = output or f"{selector}.private"
    try:
        pem = keygen.generate(algorithm, bits)
    except ValueError as e:
        fail("mailflow dkim keygen", str(e), 2)
    try:
        keygen.write_key(path, pem)
    except FileExistsError:
        fail("mailflow dkim keygen", f"{path} exists: not replaced (move it away or name another --output)", 1)
    except OSError as e:
        fail("mailflow dkim keygen", f"cannot write {path}: {e.strerror}", 1)
    key = SigningKey(f"{selector}-{domain}", domain, selector, *load_private_key(pem))
    typer.echo(keygen.txt_record(key))
    typer.echo(f"; KeyTable line:     {key.name} {key.domain}:{selector}:{path}", err=True)
    typer.echo(f"; SigningTable line: *@{key.domain} {key.name}", err=True)


def dns_records(domain: str = typer.Argument(..., help="the mail domain"),
                config: Optional[str] = ConfigOption) -> None:
    """The DNS records to publish for DOMAIN (MX, SPF, DKIM, DMARC, MTA-STS, TLS-RPT, PTR), from the configuration."""
    from mailflow.deliverability.records import records

    cfg = load(config)
    try:
        lines = records(cfg, mail_domain("mailflow dns-records", domain))
    except ConfigError as e:
        fail_config("mailflow dns-records", e, config_name(config_path(config)))
    for line in lines:
        typer.echo(line)


def check_deliverability(domain: Optional[str] = typer.Argument(None, help="the mail domain (default: mydomain)"),
                         config: Optional[str] = ConfigOption) -> None:
    """Ask DNS what receivers see for DOMAIN: PTR and HELO, SPF, DKIM, DMARC, MX, MTA-STS, TLS-RPT. Exit 1 when a
    point fails."""
    from mailflow.deliverability.check import exit_code

    cfg = load(config)
    try:
        findings = asyncio.run(run_check(cfg, mail_domain("mailflow check-deliverability", domain or cfg.domain)))
    except ConfigError as e:
        fail_config("mailflow check-deliverability", e, config_name(config_path(config)))
    for finding in findings:
        typer.echo(f"{finding.verdict.upper():4} {finding.point}: {finding.text}")
        if finding.advice:
            typer.echo(f"     -> {finding.advice}")
    raise typer.Exit(exit_code(findings))


def mail_domain(command: str, text: str) -> str:
    """`text` as a domain name (lower case, IDNA A-labels, no trailing dot); else exit 2 naming it."""
    domain = normalise_domain(text)
    if not domain or domain.startswith("[") or not is_valid_domain(domain):
        fail(command, f"{text!r} is not a domain name", 2)
    return domain


async def run_check(cfg: Config, domain: str, *, resolver=None, fetcher=None):
    """The check with the resolver [dns] describes (or the one given) and an MTA-STS fetcher over it."""
    from mailflow.app import build_resolver
    from mailflow.deliverability.check import check
    from mailflow.transports.smtp.mtasts import HttpsPolicyFetcher

    own = resolver is None
    resolver = resolver or build_resolver(cfg.dns)
    fetcher = fetcher or HttpsPolicyFetcher(resolver, ca_file=cfg.smtp.tls_ca_file, timeout=cfg.mta_sts.fetch_timeout)
    try:
        return await check(cfg, domain, resolver, fetcher)
    finally:
        if own:
            await resolver.close()


def tls_steps(cfg: Config, steps: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """See the module docstring."""
    wanted = [i for i, (_, label, _) in enumerate(steps) if label == "nexthop" and i
              and steps[i - 1][1] == "transport" and cfg.smtp_client_of(steps[i - 1][2]) is not None]
    if not wanted:
        return steps
    texts = asyncio.run(_tls_texts(cfg, [(steps[i - 1][2], steps[i][2].partition("  (")[0])  # without "  (relayhost)"
                                         for i in wanted]))
    out = list(steps)
    for offset, (i, text) in enumerate(zip(wanted, texts)):
        out.insert(i + 1 + offset, (steps[i][0], "tls", text))
    return out


async def _tls_texts(cfg: Config, routes: list[tuple[str, str]]) -> list[str]:
    """The TLS policy of each (transport, nexthop), as the SMTP client that transport stands for finds it."""
    from mailflow.app import build_resolver
    from mailflow.transports import build_mta_sts
    from mailflow.transports.smtp import SmtpTransport
    from mailflow.transports.smtp.tls import without_dane

    resolver = build_resolver(cfg.dns)
    mta_sts = build_mta_sts(cfg, resolver)
    clients: dict[str, SmtpTransport] = {}
    for name in dict.fromkeys(transport for transport, _ in routes):
        _, section = cfg.smtp_client_of(name) or ("smtp", cfg.smtp)
        clients[name] = SmtpTransport(section, resolver=resolver, helo_name=section.helo_name or cfg.myhostname,
                                      mta_sts=mta_sts, level_source=cfg.smtp.key_source(name, "tls_security_level"))
    texts = []
    try:
        for name, nexthop in routes:
            try:
                destination = await clients[name].tls_policy(nexthop)
            except Exception as e:  # noqa: BLE001 (a bad next hop or a table that cannot answer: say so, go on)
                texts.append(f"unknown: {getattr(e, 'text', None) or e}")
                continue
            text = destination.policy.describe()
            if destination.policy.dane:
                fallback = destination.fallback or without_dane(destination.policy.level)
                text += f"; per MX host: its TLSA records, else {fallback.describe()}"
            texts.append(text)
    finally:
        for client in clients.values():
            await client.close()
        await resolver.close()
    return texts
