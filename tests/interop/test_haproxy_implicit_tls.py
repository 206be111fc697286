"""Port 465 behind a real HAProxy (docs/scaling.md): `mode tcp`, `server ... send-proxy-v2`, no TLS at the
balancer, in front of a submissions listener with upstream_proxy_protocol "haproxy" (mailcow's 10465). The
client speaks TLS from its first byte to HAProxy on ::1; HAProxy (on 127.0.0.1 towards mailflow) passes the
PROXY v2 header, then the client's bytes: the session, its log and the Received header name the client [::1],
not the balancer. HAProxy's health checks (check-send-proxy: a v2 LOCAL header, then a close) keep the back end UP
and are no warnings.
"""
from __future__ import annotations

import base64
import logging
import re
import socket

import pytest

from tests.support import SmtpClient, eventually, maildir_messages
from tests.support.haproxy import haproxy_instance

pytestmark = pytest.mark.interop


def settings(cert: str, users: str) -> dict:
    listener = {"address": "127.0.0.1:0", "role": "submissions",
                "overrides": {"upstream_proxy_protocol": "haproxy", "starttls_timeout": 5}}
    return {"smtpd": {"tls_cert_file": cert, "sasl_user_maps": [users], "auth_failure_delay": 0,
                      "listeners": [listener]}}


async def test_a_465_client_through_haproxy_send_proxy_v2_is_the_sessions_client(mailflow_server, pki, users,
                                                                                 caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="mailflow.smtpd")
    _, cert, ctx = pki
    mf = await mailflow_server(**settings(cert, users))
    with haproxy_instance([mf.smtpd.address_of("submissions")[1]], bind="::1") as balancer:
        await eventually(lambda: balancer.states() == {"n1": "UP"})
        sock = socket.create_connection(("::1", balancer.port), timeout=5)
        sock.setblocking(False)
        c = await SmtpClient.connect(0, tls=ctx, sock=sock)
        assert c.writer.get_extra_info("ssl_object") is not None
        assert (await c.cmd("EHLO client.test"))[0] == 250
        assert (await c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret").decode()))[0] == 235
        assert (await c.cmd("MAIL FROM:<alice@local.test>"))[0] == 250
        assert (await c.cmd("RCPT TO:<alice@local.test>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(b"Subject: through HAProxy\r\n\r\nhello\r\n."))[0] == 250
        assert (await c.cmd("QUIT"))[0] == 221
        await c.close()
        assert balancer.states() == {"n1": "UP"}  # its checks (LOCAL, then a close) all along
    # its checks close with a reset, mostly before mailflow accepts them: info lines, never a warning
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # (haproxy_instance probes the front end once it listens: a session from [::1] too, ended in its handshake)
    sessions = [r.getMessage() for r in caplog.records if " ehlo=1 auth=1 mail=1 rcpt=1 data=1 quit=1" in
                r.getMessage()]
    assert len(sessions) == 1 and re.match(r"disconnect from \S+\[::1\] ", sessions[0]), sessions
    messages = await eventually(lambda: maildir_messages(tmp_path / "mail" / "alice" / "Maildir"))
    received = next(line for line in messages[0].split(b"\n") if line.startswith(b"Received: "))
    # ([::1]; Postfix writes [IPv6:::1], for any IPv6 client: not this test's matter)
    assert received.startswith(b"Received: from client.test (") and received.endswith(b"::1])"), received
    assert b"with ESMTPSA" in messages[0] and b"127.0.0.1" not in messages[0]
