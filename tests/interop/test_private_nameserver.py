"""The test support for a private Postfix that asks a DNS server of the test's (tests.support.postfix:
private_nameserver_address, postfix_instance(nameserver=...)): where that cannot run (no root, no unshare or no
mount namespace) a test skips, or fails under MAILFLOW_REQUIRE_TOOLS=1, before anything binds port 53."""
from __future__ import annotations

import os

import pytest

from tests.support.postfix import private_nameserver_address

pytestmark = pytest.mark.interop


def test_without_root_the_address_is_refused_before_port_53_is_bound(monkeypatch):
    monkeypatch.delenv("MAILFLOW_REQUIRE_TOOLS", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        private_nameserver_address()
    monkeypatch.setenv("MAILFLOW_REQUIRE_TOOLS", "1")
    with pytest.raises(pytest.fail.Exception, match="needs root"):
        private_nameserver_address()
