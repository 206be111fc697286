"""mailflow.logs: printable(), the Postfix-style syslog layout, the JSON layout, the disconnect statistics."""
from __future__ import annotations

import json
import logging
import re

from mailflow.config import LogConfig
from mailflow.logs import (JsonFormatter, MailLog, SmtpdLog, SyslogFormatter, command_stats, escaped, printable,
                           service_of, setup_logging)


def test_printable_replaces_what_a_terminal_would_obey():
    assert printable("a\x1b[2Jb\x08c\x7fd\u0085e\u2028f\u2029g\tn\r\n\x00") == "a?[2Jb?c?d?e?f?g?n???"
    assert printable("café ✓ 日本") == "café ✓ 日本"  # printable UTF-8 stays (SMTPUTF8)
    assert printable("\udcff\u200b\u00a0") == "???"  # a lone surrogate, a format character, a non-ASCII space
    assert printable(printable("x\x1b")) == "x?"


def test_command_stats_are_postfix_3s():
    counts = {"quit": [1, 1], "ehlo": [1, 1], "rcpt": [1, 3], "mail": [1, 1], "data": [1, 1], "unknown": [0, 2]}
    assert command_stats(counts) == " ehlo=1 mail=1 rcpt=1/3 data=1 quit=1 unknown=0/2 commands=5/9"
    assert command_stats({}) == " commands=0/0"
    assert command_stats({"ehlo": [1, 1], "quit": [1, 1]}) == " ehlo=1 quit=1 commands=2"


def records(logger_name: str):
    captured: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            captured.append(record)

    logger = logging.getLogger(logger_name)
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    return logger, captured


def test_syslog_layout_names_the_service_and_prefixes_warnings():
    logger, captured = records("test.logs.smtpd")
    log = SmtpdLog(logger)
    log.reject("RCPT", "unknown[192.0.2.1]", "554 5.7.1 <r@x.test>: Relay access denied", sender="s@y.test",
               recipient="r@x.test", helo="h\x1b")
    log.auth_failed("unknown[192.0.2.1]", "LOGIN", "authentication failure", "bob")
    fmt = SyslogFormatter("mx.example.test", "postfix-mailflow", pid=42)
    lines = [fmt.format(r) for r in captured]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d"
    assert re.fullmatch(stamp + r" mx\.example\.test postfix-mailflow/smtpd\[42\]: NOQUEUE: reject: RCPT from "
                        r"unknown\[192\.0\.2\.1\]: 554 5\.7\.1 <r@x\.test>: Relay access denied; from=<s@y\.test> "
                        r"to=<r@x\.test> proto=ESMTP helo=<h\?>", lines[0]), lines[0]
    assert lines[1].endswith("postfix-mailflow/smtpd[42]: warning: unknown[192.0.2.1]: SASL LOGIN authentication "
                             "failed: authentication failure, sasl_username=bob")


def test_services_follow_the_stage():
    def record(name, **extra):
        r = logging.LogRecord(name, logging.INFO, __file__, 1, "x", (), None)
        r.__dict__.update(extra)
        return r

    assert [service_of(record(n)) for n in ("mailflow", "mailflow.cleanup", "mailflow.qmgr", "mailflow.mbox",
                                             "asyncio", "mailflow.smtp")] == [
        "master", "cleanup", "qmgr", "local", "master", "smtp"]
    assert service_of(record("mailflow.mail", service="pickup")) == "pickup"


def test_json_layout_keeps_events_and_fields():
    logger, captured = records("test.logs.mail")
    MailLog(logger).received("ABC123", "unknown[192.0.2.1]", sasl_method="PLAIN", sasl_username="al\x1bice")
    SmtpdLog(logger).connect("unknown[192.0.2.1]")
    first, second = (json.loads(JsonFormatter().format(r)) for r in captured)
    assert first["queue_id"] == "ABC123" and first["event"] == "received" and first["service"] == "smtpd"
    assert first["sasl_username"] == "al?ice" and first["client"] == "unknown[192.0.2.1]"
    assert second["event"] == "connect" and "queue_id" not in second


def test_setup_logging_writes_the_named_file(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(LogConfig(file=str(tmp_path / "maillog"), syslog_name="postfix-test"), "mx.example.test")
        logging.getLogger("mailflow.qmgr").warning("queue file %s", "x\x1b")
        for handler in root.handlers:
            handler.flush()
        text = (tmp_path / "maillog").read_text()
        assert " mx.example.test postfix-test/qmgr[" in text and text.endswith("]: warning: queue file x?\n")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_quoted_input_is_escaped_as_postfix_escape_3_writes_it():
    assert escaped(b"MAIL FROM:<a@b>\r\n") == "MAIL FROM:<a@b>\\r\\n"
    assert escaped(b"a\\b\t\x00\x1b\x7f\xc3\xa9") == "a\\\\b\\t\\000\\033\\177\\303\\251"
