"""mailflow.logs: printable(), the Postfix-style syslog layout, the JSON layout, the disconnect statistics, the
delivery line's times."""
from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from mailflow import logs
from mailflow.config import LogConfig
from mailflow.logs import (LOG_TEXT_LIMIT, JsonFormatter, MailLog, SmtpdLog, SyslogFormatter, command_stats,
                           cut_for_log, escaped, format_tv, log_delays, printable, service_of, setup_logging)
from mailflow.model import ConnStats, MsgStats, Outcome, RcptResult, Recipient


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


# Postfix's format_tv(buf, sec, usec, 2, 2) (src/util/format_tv.c, as log_adhoc calls it): two significant digits, a
# resolution of 10 ms, rounded half up at the resolution, trailing zeros dropped; whole seconds from 10 s.
@pytest.mark.parametrize("seconds, shown", [
    (0.0, "0"), (0.004999, "0"), (0.005, "0.01"), (0.01, "0.01"), (0.0149, "0.01"), (0.1, "0.1"), (0.104, "0.1"),
    (0.105, "0.11"), (0.12, "0.12"), (0.994, "0.99"), (0.995, "1"), (1.0, "1"), (1.04, "1"), (1.05, "1.1"),
    (1.23, "1.2"), (9.94, "9.9"), (9.95, "10"), (12.3, "12"), (12.5, "13"), (99.5, "100"), (3600.2, "3600"),
    (-0.5, "0"),
])
def test_times_are_written_as_postfix_format_tv_writes_them(seconds, shown):
    assert format_tv(seconds) == shown


def test_delays_are_computed_as_postfix_log_adhoc_does():
    stats = MsgStats(arrival=100.0, active=101.0, handoff=101.5, done=104.0)
    # an SMTP session: a before the active queue, b in it, c the set-up, d the transmission; `done` ends them
    assert log_delays(stats, ConnStats(102.25), now=110.0) == (4.0, (1.0, 0.5, 0.75, 1.75))
    assert log_delays(stats, None, now=110.0) == (4.0, (1.0, 0.5, 0.0, 2.5))  # no session: d from the hand-off
    assert log_delays(stats._replace(done=0.0), None, now=110.0) == (10.0, (1.0, 0.5, 0.0, 8.5))  # the line's time
    # qmgr deferred it itself (no agent had it): b up to the line; none of it reached qmgr: all of it is a
    assert log_delays(MsgStats(100.0, 101.0), None, now=103.0) == (3.0, (1.0, 2.0, 0.0, 0.0))
    assert log_delays(MsgStats(100.0), None, now=103.0) == (3.0, (3.0, 0.0, 0.0, 0.0))
    # a clock that stepped back counts as zero, never as a negative time
    assert log_delays(MsgStats(100.0, 99.0, 98.0, 97.0), ConnStats(98.5), now=0.0) == (0.0, (0.0, 0.0, 0.5, 0.0))


def test_a_delivery_line_has_postfix_log_adhoc_fields_in_its_order():
    logger, captured = records("test.logs.mail")
    log = MailLog(logger)
    rcpt = Recipient(0, "bob@example.test", "bob@example.test")
    stats = MsgStats(arrival=100.0, active=100.004, handoff=100.13, done=101.37)
    log.result("Q1", RcptResult(rcpt, Outcome.SENT, "2.0.0", "250 2.0.0 Ok", "mx.example.test[192.0.2.5]:25",
                                conn=ConnStats(100.2), stats=stats), stats, now=200.0)
    assert captured[0].getMessage() == (
        "Q1: to=<bob@example.test>, relay=mx.example.test[192.0.2.5]:25, delay=1.4, delays=0/0.13/0.07/1.2, "
        "dsn=2.0.0, status=sent (250 2.0.0 Ok)")
    fields = json.loads(JsonFormatter().format(captured[0]))
    assert (fields["delay"], fields["delays"]) == (1.37, [0.004, 0.126, 0.07, 1.17])
    # qmgr's own deferral, without an agent: the time of the line ends it
    log.result("Q2", RcptResult(rcpt, Outcome.DEFERRED, "4.3.0", "address resolver failure"), MsgStats(100.0, 160.0),
               now=3700.0)
    assert captured[1].getMessage() == ("Q2: to=<bob@example.test>, relay=none, delay=3600, delays=60/3540/0/0, "
                                        "dsn=4.3.0, status=deferred (address resolver failure)")


def test_conn_use_counts_the_uses_of_a_reused_connection():
    """Postfix's `conn_use=N` after relay= from a connection's second use on (its reuse_count + 1)."""
    logger, captured = records("test.logs.conn_use")
    log = MailLog(logger)
    stats = MsgStats(100.0, 100.0, 100.0, 100.5)
    for conn in (ConnStats(100.2, 1), ConnStats(100.2, 3), None):
        log.result("Q1", RcptResult(Recipient(0, "b@x.test", "b@x.test"), Outcome.SENT, "2.0.0", "250 Ok",
                                    "mx.x.test[192.0.2.5]:25", conn=conn), stats, now=101.0)
    assert [r.getMessage().partition(", delay=")[0] for r in captured] == [
        "Q1: to=<b@x.test>, relay=mx.x.test[192.0.2.5]:25",
        "Q1: to=<b@x.test>, relay=mx.x.test[192.0.2.5]:25, conn_use=3",
        "Q1: to=<b@x.test>, relay=mx.x.test[192.0.2.5]:25"]
    assert [json.loads(JsonFormatter().format(r))["conn_use"] for r in captured] == [1, 3, 0]


def test_a_results_times_are_not_part_of_what_it_is():
    """`conn` and `stats` are not stored (model.py): they take no part in a result's equality, hash or repr."""
    plain = RcptResult(Recipient(0, "b@x.test", "b@x.test"), Outcome.SENT, "2.0.0", "250 Ok", "mx.x.test[192.0.2.5]:25")
    timed = dataclasses.replace(plain, conn=ConnStats(100.2, 2), stats=MsgStats(100.0, 100.0, 100.1, 100.5))
    assert timed == plain and hash(timed) == hash(plain)
    assert repr(timed) == repr(plain)


def test_orig_to_is_left_out_when_it_differs_only_in_case():
    """Postfix's log_adhoc compares the two with strcasecmp_utf8: a table that gave the address another case
    (a virtual alias `bob@x.test -> Bob@x.test`) adds no orig_to."""
    logger, captured = records("test.logs.orig_to")
    log = MailLog(logger)
    for address, original in (("Bob@x.test", "bob@X.test"), ("bob@x.test", "fwd@x.test"), ("bob@x.test", "")):
        log.result("Q1", RcptResult(Recipient(0, address, original), Outcome.SENT, "2.0.0", "ok", "local"),
                   MsgStats(100.0), now=100.0)
    assert [r.getMessage().partition(", relay=")[0] for r in captured] == [
        "Q1: to=<Bob@x.test>", "Q1: to=<bob@x.test>, orig_to=<fwd@x.test>", "Q1: to=<bob@x.test>"]
    assert [json.loads(JsonFormatter().format(r))["orig_to"] for r in captured] == ["", "fwd@x.test", ""]


def test_a_log_file_that_cannot_be_reopened_after_rotation_costs_lines_not_the_caller(tmp_path, capsys):
    """logrotate moved the file while no descriptor was left (EMFILE): Python's WatchedFileHandler reopens it
    outside its own error handling, so the OSError reached whoever logged (a session, qmgr) at every line
    until a descriptor came free. Now the line is lost, stderr says so once, and the new file is written when
    it can be opened."""
    import errno

    from mailflow.logs import LogFileHandler

    path = tmp_path / "mail.log"
    handler = LogFileHandler(str(path))
    logger = logging.Logger("rotated")
    logger.addHandler(handler)
    logger.warning("before")
    path.rename(tmp_path / "mail.log.1")
    opened = handler._open

    def no_descriptor():
        raise OSError(errno.EMFILE, "Too many open files")

    handler._open = no_descriptor
    for n in range(3):
        logger.warning("lost %d", n)  # raised OSError before
    handler._open = opened
    logger.warning("after")
    handler.close()
    assert path.read_text() == "after\n"
    assert capsys.readouterr().err.splitlines() == [
        f"mailflow: warning: cannot write the log file {path}: Too many open files (1 failed writes)",
        f"mailflow: warning: the log file {path} is written again after 3 failed writes"]


def test_a_records_text_is_cut_at_postfixs_2000_bytes_never_inside_a_character():
    logger, captured = records("test.logs.smtp")
    MailLog(logger).not_signed("ABC123", "seal", "é" * 1500)  # 23 bytes, then 2 a character: 2000 splits one
    logger.warning("peer said: %s", "x" * 1_000_000)
    syslog = SyslogFormatter("mx.example.test", "postfix-mailflow", pid=42)
    texts = [syslog.format(r).split("[42]: ", 1)[1] for r in captured]
    assert [len(t.encode()) for t in texts] == [1999, len("warning: ") + 2000]
    assert texts[0].endswith("é") and texts[1].endswith("x")
    event = json.loads(JsonFormatter().format(captured[0]))
    assert len(event["reason"].encode()) <= 2000 and event["reason"].startswith("ééé")
    assert len(json.loads(JsonFormatter().format(captured[1]))["message"]) == 2000


def test_a_traceback_shows_its_last_lines_and_the_exception_on_one_line():
    """An error whose text has 5000 line ends, raised 50 calls deep: its record is the message, a line saying how
    much of the traceback was left out, the traceback's last 20 lines and `Type: text` on one line. Each line of
    the formatted traceback was a log line: 5004 lines for that text alone."""
    logger, captured = records("test.logs.traceback")

    def deep(n):
        if n:
            deeper(n - 1)  # (two functions in turn: Python shows repeated frames as one line)
        raise ValueError("start" + "\nline" * 5000)

    def deeper(n):
        deep(n)

    try:
        deep(50)
    except ValueError:
        logger.exception("it failed")
    syslog = SyslogFormatter("mx.example.test", "postfix-mailflow", pid=42)
    lines = [line.split("[42]: error: ", 1)[1] for line in syslog.format(captured[0]).splitlines()]
    assert len(lines) == 1 + 1 + 20 + 1, lines[:5]
    assert lines[0] == "it failed" and re.fullmatch(r"\(\d+ lines of the traceback left out\)", lines[1]), lines[1]
    assert lines[-1].startswith("ValueError: start line line") and len(lines[-1].encode()) == 2000
    assert "raise ValueError" in lines[-2]


def test_an_error_whose_text_ends_in_a_line_end_is_written_once():
    """The exception line of an error whose text ends in "\\n" (a peer's reply quoted whole): written once, after
    the traceback. It was written twice, once as the traceback's last line and once as the exception line."""
    logger, captured = records("test.logs.line_end")
    try:
        raise ValueError("the peer said no\n")
    except ValueError:
        logger.exception("it failed")
    syslog = SyslogFormatter("mx.example.test", "postfix-mailflow", pid=42)
    lines = [line.split("[42]: error: ", 1)[1] for line in syslog.format(captured[0]).splitlines()]
    assert lines[0] == "it failed" and lines[1].startswith("Traceback"), lines
    assert [line for line in lines if line.startswith("ValueError")] == ["ValueError: the peer said no"], lines


def test_a_formatter_makes_printable_only_the_text_it_keeps(monkeypatch):
    """A megabyte of text with a control character (a peer's reply quoted whole): the formatters walk only the
    LOG_TEXT_LIMIT characters they can keep, and write the same line as before. printable() walked the whole
    megabyte first (85 ms on the event loop, for one line)."""
    logger, captured = records("test.logs.walk")
    logger.warning("peer said: %s", "\x1b" + "x" * 1_000_000)
    walked = []
    real = logs.printable
    monkeypatch.setattr(logs, "printable", lambda text, *a: walked.append(len(str(text))) or real(text, *a))
    line = SyslogFormatter("mx.example.test", "postfix-mailflow", pid=42).format(captured[0])
    message = json.loads(JsonFormatter().format(captured[0]))["message"]
    assert line.split("[42]: warning: ", 1)[1] == message == cut_for_log(real(captured[0].getMessage()))
    assert walked and max(walked) <= LOG_TEXT_LIMIT, walked


def test_a_json_record_is_one_line_of_at_most_its_limit_whatever_json_escapes():
    """Text that JSON writes longer (quotes and backslashes doubled) and a traceback whose error holds a megabyte:
    each record's line stays within JSON_RECORD_LIMIT bytes, the short fields whole, the long ones cut to the start
    of their text. Each field was cut to 2000 bytes before escaping (a 16 KB line) and the traceback not at all (a
    megabyte)."""
    logger, captured = records("test.logs.json")
    MailLog(logger).not_signed("ABC123", "seal", '"\\' * 4000)
    try:
        raise ValueError('"' * 1_000_000)
    except ValueError:
        logger.exception("it failed: %s", "\\" * 3000)
    for record in captured:
        line = JsonFormatter().format(record)
        assert "\n" not in line and len(line.encode()) <= 4000, len(line.encode())  # (JSON_RECORD_LIMIT)
        event = json.loads(line)
        assert event["level"] in ("info", "error") and event["logger"] == "test.logs.json"
    signed = json.loads(JsonFormatter().format(captured[0]))
    assert signed["queue_id"] == "ABC123" and signed["reason"].startswith('"\\"\\') and len(signed["reason"]) > 1000
    failed = json.loads(JsonFormatter().format(captured[1]))
    assert failed["message"].startswith("it failed: \\\\") and failed["exception"].startswith("(3 lines left out)")
    assert failed["exception"].splitlines()[-1].startswith('ValueError: ""')


def test_a_json_records_traceback_cut_to_its_share_keeps_its_last_lines():
    """A traceback that does not fit in what the message leaves of the JSON record: its first lines are dropped (a
    line says how many), its innermost frame and the exception line stay. The cut kept its start and dropped them:
    the line that says what went wrong was the first to go."""
    logger, captured = records("test.logs.json_traceback")

    def deep(n):
        if n:
            deeper(n - 1)
        raise KeyError("missing header " + "v" * 1500)

    def deeper(n):
        deep(n)

    try:
        deep(30)
    except KeyError:
        logger.exception("%s: delivery failed, reply was %s", "Q1", "550 " + "r" * 1800)
    line = JsonFormatter().format(captured[0])
    assert len(line.encode()) <= 4000, len(line.encode())  # (JSON_RECORD_LIMIT)
    lines = json.loads(line)["exception"].splitlines()
    assert re.fullmatch(r"\(\d+ lines left out\)", lines[0]) and 3 < len(lines) < 20, lines
    assert lines[-1].startswith("KeyError: 'missing header vvv") and 'raise KeyError("missing header' in lines[-2]


def test_the_warning_for_a_message_deleted_under_its_attempt_is_written_at_level_warning():
    """qmgr's `gone` line is a warning (Postfix's msg_warn): a log at level warning, where the info lines are off,
    still gets it, in Postfix's words."""
    logger, captured = records("test.logs.gone")
    logger.setLevel(logging.WARNING)
    log = MailLog(logger)
    log.removed("ABC123")
    log.gone("ABC123", deferred=True)
    assert [r.getMessage() for r in captured] == [
        "qmgr_active_defer: rename ABC123 from active to deferred: No such file or directory"]
