"""`mailflow health` (the container's HEALTHCHECK): 0 when the first SMTP listener greets with 220, through a
PROXY-protocol listener and an implicit-TLS one too; 1, saying why, when nothing answers."""
from __future__ import annotations

import sys

from tests.support import free_port, run_tool


async def health(config, timeout: str = "5") -> tuple[int, str]:
    return await run_tool(sys.executable, "-m", "mailflow", "health", "--timeout", timeout, "-c", str(config),
                          timeout=30)


async def test_healthy_when_the_listener_greets(mailflow_server, write_config, tmp_path):
    port = free_port()
    smtpd = {"listen": [f"127.0.0.1:{port}"]}
    await mailflow_server(smtpd=smtpd)
    code, out = await health(write_config(tmp_path / "mailflow.toml", smtpd=smtpd))
    assert (code, out.strip()) == (0, f"127.0.0.1:{port}: 220 mx.mailflow.test ESMTP mailflow"), out


async def test_healthy_behind_a_balancer_and_on_implicit_tls(mailflow_server, write_config, tmp_path, pki, users):
    _, cert, _ = pki
    proxied = {"listen": [f"127.0.0.1:{free_port()}"], "upstream_proxy_protocol": "haproxy"}
    await mailflow_server(smtpd=proxied)
    code, out = await health(write_config(tmp_path / "proxied.toml", smtpd=proxied))
    assert code == 0 and ": 220 " in out, out

    tls_port = free_port()
    implicit = {"listen": [], "tls_cert_file": cert, "sasl_user_maps": [users],
                "listeners": [{"address": f"127.0.0.1:{tls_port}", "role": "submissions"}]}
    await mailflow_server(smtpd=implicit, queue_directory=str(tmp_path / "queue-2"))
    config = tmp_path / "implicit.toml"
    config.write_text(f'[smtpd]\nlisten = []\ntls_cert_file = "{cert}"\nsasl_user_maps = ["{users}"]\n'
                      f'[[smtpd.listeners]]\naddress = "127.0.0.1:{tls_port}"\nrole = "submissions"\n')
    code, out = await health(config)
    assert code == 0 and f"127.0.0.1:{tls_port}: 220 " in out, out


async def test_unhealthy_when_nothing_answers(write_config, tmp_path):
    port = free_port()
    code, out = await health(write_config(tmp_path / "mailflow.toml", smtpd={"listen": [f"127.0.0.1:{port}"]}))
    assert code == 1 and f"mailflow health: 127.0.0.1:{port}: [Errno 111] Connection refused" in out, out


async def test_a_timeout_that_is_no_number_of_seconds_is_a_usage_error(write_config, tmp_path):
    """inf and 1e400 overflowed the socket's timeout (a traceback); nan and -1 were tried (exit 1)."""
    config = write_config(tmp_path / "mailflow.toml", smtpd={"listen": [f"127.0.0.1:{free_port()}"]})
    for timeout in ("inf", "1e400", "nan", "-1", "0"):
        code, out = await health(config, timeout)
        assert code == 2 and "is not a number of seconds above 0" in out and "Traceback" not in out, (timeout, out)


async def test_healthy_on_implicit_tls_behind_a_balancer(mailflow_server, tmp_path, pki, users):
    """A submissions listener with upstream_proxy_protocol (465 behind HAProxy): the probe's v2 LOCAL header, then
    its handshake, then the greeting over TLS."""
    _, cert, _ = pki
    port = free_port()
    await mailflow_server(smtpd={"listen": [], "tls_cert_file": cert, "sasl_user_maps": [users], "listeners": [
        {"address": f"127.0.0.1:{port}", "role": "submissions", "overrides": {"upstream_proxy_protocol": "haproxy"}}]})
    config = tmp_path / "implicit.toml"
    config.write_text(f'[smtpd]\nlisten = []\ntls_cert_file = "{cert}"\nsasl_user_maps = ["{users}"]\n'
                      f'[[smtpd.listeners]]\naddress = "127.0.0.1:{port}"\nrole = "submissions"\n'
                      f'overrides = {{ upstream_proxy_protocol = "haproxy" }}\n')
    code, out = await health(config)
    assert code == 0 and f"127.0.0.1:{port}: 220 " in out, out
