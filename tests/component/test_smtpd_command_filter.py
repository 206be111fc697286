"""smtpd_command_filter ([smtpd] command_filter): each command line of a client rewritten by a table before smtpd
parses it (Postfix 2.7's smtpd_command_filter), logged as Postfix's smtpd logs it; a table that cannot answer ends
the session with 421 4.3.0 Server local data error. Real sessions on loopback."""
from __future__ import annotations

import logging

from mailflow import status
from mailflow.config import config_from_dict
from tests.support import SmtpClient

HOST = "mx.mailflow.test"


async def test_a_broken_clients_command_is_rewritten_before_it_is_parsed_and_logged(mailflow_server, tmp_path,
                                                                                    caplog):
    table = tmp_path / "command_filter"
    table.write_text("/^(RCPT\\s+TO:\\s*<[^>]*>)\\s+XBROKEN=\\S+$/ $1\n")  # a parameter smtpd would refuse
    caplog.set_level(logging.INFO, "mailflow")
    mf = await mailflow_server(smtpd={"command_filter": [f"regexp:{table}"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("MAIL FROM:<bob@remote.test>"))[0] == 250
    assert (await c.cmd("RCPT TO:<alice@local.test> XBROKEN=1"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"Subject: t\r\n\r\nbody\r\n.\r\n")
    assert (await c.reply())[0] == 250
    await c.cmd("QUIT")
    assert 'localhost[127.0.0.1]: replacing command "RCPT TO:<alice@local.test> XBROKEN=1" with ' \
           '"RCPT TO:<alice@local.test>"' in [r.getMessage() for r in caplog.records]


async def test_without_the_filter_the_same_command_is_refused(mailflow_server):
    mf = await mailflow_server()
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    await c.cmd("EHLO client.test")
    await c.cmd("MAIL FROM:<bob@remote.test>")
    assert (await c.cmd("RCPT TO:<alice@local.test> XBROKEN=1"))[0] == 555


async def test_a_command_filter_that_cannot_answer_ends_the_session_with_a_local_data_error(mailflow_server, caplog):
    caplog.set_level(logging.INFO, "mailflow")
    mf = await mailflow_server(smtpd={"command_filter": ["fail:down"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert await c.cmd("EHLO client.test") == status.local_data_error(HOST)
    assert await c.closed()
    lines = [r.getMessage() for r in caplog.records]
    assert 'fail:down lookup error for "EHLO client.test"' in lines
    assert f"NOQUEUE: reject: CONNECT from localhost[127.0.0.1]: 421 4.3.0 {HOST} Server local data error" in lines


async def test_a_command_filter_table_that_may_wait_is_asked_off_the_event_loop(mailflow_server, monkeypatch):
    """unix: (the name service) and sqlite: may wait: each command's lookup runs in a worker thread (TableCache.run,
    with its deadline), never on the loop every session shares."""
    import threading

    from mailflow.tables.unix import UnixTable
    asked_in: list[int] = []

    def lookup(self, key: str) -> str | None:
        asked_in.append(threading.get_ident())
        return "NOOP" if key == "XWAIT" else None
    monkeypatch.setattr(UnixTable, "lookup", lookup)
    mf = await mailflow_server(smtpd={"command_filter": ["unix:passwd.byname"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("XWAIT"))[0] == 250  # (rewritten to NOOP)
    await c.cmd("QUIT")
    assert asked_in and threading.get_ident() not in asked_in


async def test_a_command_that_is_not_utf8_is_refused_before_the_filter_sees_it(mailflow_server, tmp_path):
    """Postfix's smtpd checks UTF-8 validity (smtputf8_enable, the default) before smtpd_command_filter: 500 5.5.2
    bad UTF-8 syntax, whatever the filter would have made of the line."""
    table = tmp_path / "command_filter"
    table.write_text("/^XBAD/ NOOP\n")
    mf = await mailflow_server(smtpd={"command_filter": [f"regexp:{table}"]})
    c = await SmtpClient.connect(mf.smtp_addresses[0][1])
    assert (await c.cmd("EHLO client.test"))[0] == 250
    assert (await c.cmd("XBAD ok"))[0] == 250  # (rewritten to NOOP)
    await c.send(b"XBAD \xff\r\n")
    assert await c.reply() == (500, "500 5.5.2 Error: bad UTF-8 syntax")


async def test_a_reload_changes_the_command_filter_for_new_sessions(mailflow_server, tmp_path):
    """RELOADED names command_filter: a reload that sets smtpd_command_filter rewrites the next session's commands
    (the running listener keeps its socket; its filter is the new configuration's)."""
    table = tmp_path / "command_filter"
    table.write_text("/^(RCPT\\s+TO:\\s*<[^>]*>)\\s+XBROKEN=\\S+$/ $1\n")
    mf = await mailflow_server()
    port = mf.smtp_addresses[0][1]
    settings = mf.config.model_dump()
    await mf.reload(config_from_dict({**settings, "smtpd": {**settings["smtpd"],
                                                            "command_filter": [f"regexp:{table}"]}}))
    assert mf.smtp_addresses[0][1] == port
    c = await SmtpClient.connect(port)
    await c.cmd("EHLO client.test")
    await c.cmd("MAIL FROM:<bob@remote.test>")
    assert (await c.cmd("RCPT TO:<alice@local.test> XBROKEN=1"))[0] == 250
    await c.cmd("QUIT")
