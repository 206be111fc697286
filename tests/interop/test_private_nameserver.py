"""The test support for a private Postfix that asks a DNS server of the test's (tests.support.postfix:
private_nameserver_address, postfix_instance(nameserver=...)): where that cannot run (no root, no unshare or no
mount namespace) a test skips, or fails under MAILFLOW_REQUIRE_TOOLS=1, before anything binds port 53; the DNS
server on port 53 (conftest's private_dns_zone) takes another address when one is in use."""
from __future__ import annotations

import os
import socket

import pytest
from dnslib import DNSRecord

from tests.support import postfix as postfix_support
from tests.support.postfix import postfix_instance, private_nameserver_address, require_postfix

pytestmark = pytest.mark.interop


def test_without_root_the_address_is_refused_before_port_53_is_bound(monkeypatch):
    monkeypatch.delenv("MAILFLOW_REQUIRE_TOOLS", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        private_nameserver_address()
    monkeypatch.setenv("MAILFLOW_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        private_nameserver_address()


@pytest.fixture
def failing_unshare(tmp_path, monkeypatch):
    """An `unshare` first on PATH that fails as it does in a container without CAP_SYS_ADMIN."""
    fake = tmp_path / "unshare"
    fake.write_text("#!/bin/sh\necho 'unshare: unshare failed: Operation not permitted' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


@pytest.mark.parametrize("required", [False, True])
async def test_without_a_mount_namespace_a_private_nameserver_skips_or_fails_as_asked(failing_unshare, monkeypatch,
                                                                                   required):
    require_postfix()  # (root and Postfix: what is tested is the namespace)
    if required:
        monkeypatch.setenv("MAILFLOW_REQUIRE_TOOLS", "1")
    else:
        monkeypatch.delenv("MAILFLOW_REQUIRE_TOOLS", raising=False)
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=r"needs a mount namespace \(unshare -m: unshare: unshare failed: Operation not"):
        async with postfix_instance({}, nameserver="127.53.254.254"):
            pass
    with pytest.raises(outcome, match="needs a mount namespace"):
        private_nameserver_address()


def test_a_private_dns_zone_takes_another_address_when_one_is_in_use(private_dns_zone, monkeypatch):
    require_postfix()  # (root: port 53)
    taken, free = "127.53.255.1", "127.53.255.2"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:  # another worker's server
        other.bind((taken, 53))
        offered = iter([taken, free])
        monkeypatch.setattr(postfix_support, "private_nameserver_address", lambda: next(offered))
        address = private_dns_zone("ok.test. 60 IN A 192.0.2.1\n")
    assert address == free
    query = DNSRecord.question("ok.test", "A").send(free, 53, timeout=5)
    assert str(DNSRecord.parse(query).a.rdata) == "192.0.2.1"
