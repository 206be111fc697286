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
from mailflow.transports.smtp.mtasts import FetchError, HttpsPolicyFetcher
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


class NoPolicy:
    """An MTA-STS fetcher that fetches nothing (the zone's addresses are not loopback: nothing is dialled)."""

    async def fetch(self, domain: str) -> str:
        raise FetchError("not fetched in this test")


async def test_a_service_s_own_bind_address_and_helo_name_are_published_and_checked(tmp_path, ca):
    """A second outbound IP and HELO name ([smtp.services.ip2] bind_address, helo_name) were left out of SPF, the
    PTR lines and the HELO/PTR checks: ip2's mail failed SPF with records published as told."""
    def settings(nameserver: str) -> str:
        path = tmp_path / "mailflow.toml"
        path.write_text(to_toml({
            "myhostname": "mx.good.test", "mydestination": ["good.test"], "queue_directory": str(tmp_path / "queue"),
            "smtpd": {"listen": ["127.0.0.1:0"]}, "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1},
            "smtp": {"bind_address": "8.8.8.8", "services": {"ip2": {"bind_address": "9.9.9.9",
                                                                      "helo_name": "mx2.good.test"}}}}))
        return str(path)

    lines = records_of(settings("127.0.0.1:9"), "good.test")
    assert 'good.test. IN TXT "v=spf1 ip4:8.8.8.8 ip4:9.9.9.9 -all"' in lines
    assert "8.8.8.8.in-addr.arpa. IN PTR mx.good.test." in lines
    assert "9.9.9.9.in-addr.arpa. IN PTR mx2.good.test." in lines and "mx2.good.test. IN A 9.9.9.9" in lines
    nameserver, stop = start_zone(zone_text(lines), ad=False)
    try:
        config = load_config(settings(nameserver))
        resolver = build_resolver(config.dns)
        findings = await run_check(config, "good.test", resolver=resolver, fetcher=NoPolicy())
        await resolver.close()
    finally:
        stop()
    checked = [(f.point, f.verdict, f.text) for f in findings if f.point in ("helo", "ptr", "spf")]
    assert checked == [
        ("helo", "pass", "HELO name mx.good.test resolves to 8.8.8.8"),
        ("ptr", "pass", "PTR of 8.8.8.8 is mx.good.test, forward-confirmed"),
        ("helo", "pass", "HELO name mx2.good.test resolves to 9.9.9.9"),
        ("ptr", "pass", "PTR of 9.9.9.9 is mx2.good.test, forward-confirmed"),
        ("spf", "pass", checked[4][2]), ("spf", "pass", checked[5][2])], findings
