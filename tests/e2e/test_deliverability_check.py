"""`mailflow dns-records` and `mailflow check-deliverability` against the in-process DNS: the records printed for a
configuration, loaded as they are into a zone (the MTA-STS policy they describe served over HTTPS on loopback),
pass every point; a deliberately broken zone lists each fault with what to change."""
from __future__ import annotations

import pytest
import trustme
from typer.testing import CliRunner

from mailflow.app import build_resolver
from mailflow.cli import app as cli
from mailflow.cli.deliverability import run_check
from mailflow.config import load_config
from mailflow.transports.smtp.mtasts import HttpsPolicyFetcher
from tests.support.deliverability import PolicyServer, dkim_settings, make_key, start_zone
from tests.support import to_toml


@pytest.fixture
def ca():
    return trustme.CA()


def write_settings(tmp_path, nameserver: str, ca, keys) -> str:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    settings = {
        "myhostname": "mx.good.test",
        "mydestination": ["good.test"],
        "queue_directory": str(tmp_path / "queue"),
        "smtpd": {"listen": ["127.0.0.1:0"]},
        "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1},
        "smtp": {"tls_ca_file": str(ca_file)},
        "dkim": dkim_settings(tmp_path, keys),
        "deliverability": {"outbound_addresses": ["127.0.0.1"]},
    }
    path = tmp_path / "mailflow.toml"
    path.write_text(to_toml(settings))
    return str(path)


def records_of(config_path: str, domain: str) -> list[str]:
    result = CliRunner().invoke(cli, ["dns-records", domain, "-c", config_path])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def zone_text(lines: list[str]) -> str:
    return "\n".join(line for line in lines if line and not line.startswith(";")) + "\n"


def policy_text(lines: list[str]) -> str:
    start = next(i for i, line in enumerate(lines) if "the MTA-STS policy:" in line)
    return "".join(line.removeprefix(";   ") + "\n" for line in lines[start:] if line.startswith(";   "))


async def test_the_published_records_pass_every_point(tmp_path, ca):
    keys = [make_key(tmp_path, "good.test", "mail", "rsa"), make_key(tmp_path, "good.test", "ed", "ed25519")]
    config_path = write_settings(tmp_path, "127.0.0.1:9", ca, keys)
    lines = records_of(config_path, "good.test")
    assert any(line.startswith("mail._domainkey.good.test. IN TXT") for line in lines)
    assert 'good.test. IN TXT "v=spf1 ip4:127.0.0.1 -all"' in lines
    assert "1.0.0.127.in-addr.arpa. IN PTR mx.good.test." in lines

    nameserver, stop = start_zone(zone_text(lines), ad=False)
    policy_server = await PolicyServer(ca, "mta-sts.good.test", policy_text(lines)).start()
    try:
        config = load_config(write_settings(tmp_path, nameserver, ca, keys))
        resolver = build_resolver(config.dns)
        fetcher = HttpsPolicyFetcher(resolver, ca_file=config.smtp.tls_ca_file, port=policy_server.port)
        findings = await run_check(config, "good.test", resolver=resolver, fetcher=fetcher)
        await resolver.close()
    finally:
        policy_server.close()
        stop()
    assert [(f.point, f.verdict) for f in findings] == [
        ("mx", "pass"), ("helo", "pass"), ("ptr", "pass"), ("spf", "pass"), ("dkim", "pass"), ("dkim", "pass"),
        ("dmarc", "pass"), ("mta-sts", "pass"), ("tls-rpt", "pass")], findings


BROKEN_ZONE = """
bad.test. IN MX 10 mx.bad.test.
bad.test. IN MX 20 gone.bad.test.
mx.bad.test. IN A 192.0.2.99
bad.test. IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
mail._domainkey.bad.test. IN TXT "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAx"
_mta-sts.bad.test. IN TXT "v=STSv1; id=1"
"""


def test_a_broken_zone_lists_each_fault(tmp_path, ca):
    keys = [make_key(tmp_path, "bad.test", "mail", "rsa")]
    nameserver, stop = start_zone(BROKEN_ZONE, ad=False)
    try:
        config_path = write_settings(tmp_path, nameserver, ca, keys)
        with open(config_path) as f:
            text = f.read().replace('myhostname = "mx.good.test"', 'myhostname = "mx.bad.test"')
        with open(config_path, "w") as f:
            f.write(text)
        result = CliRunner().invoke(cli, ["check-deliverability", "bad.test", "-c", config_path])
    finally:
        stop()
    assert result.exit_code == 1, result.output
    verdicts = {}
    for line in result.output.splitlines():
        if not line.startswith(" "):
            verdict, point = line.split()[:2]
            verdicts.setdefault(point.rstrip(":"), set()).add(verdict)
    assert verdicts == {"mx": {"FAIL"}, "helo": {"FAIL"}, "ptr": {"FAIL"}, "spf": {"FAIL"}, "dkim": {"FAIL"},
                        "dmarc": {"FAIL"}, "mta-sts": {"FAIL"}, "tls-rpt": {"WARN"}}, result.output
    for told in ("MX host(s) without an address: gone.bad.test", "HELO name mx.bad.test resolves to 192.0.2.99",
                 "127.0.0.1 has no PTR record", "add ip4:127.0.0.1 to the SPF record of bad.test",
                 "mail._domainkey.bad.test publishes another key", "_dmarc.bad.test: no DMARC records",
                 "MTA-STS policy of bad.test (id 1) not usable"):
        assert told in result.output, result.output
