"""The admin listener's pure pieces: the metrics' counting and exposition, DSN classes, the token file, the
loopback checks, and which settings /api/config hides."""
from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailflow.admin.access import is_loopback_host, read_tokens
from mailflow.admin.api import redacted, refuse_unknown
from mailflow.clock import VirtualClock
from mailflow.config import ConfigError, beyond_loopback
from mailflow.metrics import Buckets, Metrics, dsn_class
from mailflow.capture.recorders import TranscriptBook
from mailflow.stages.smtpd.transcript import SessionObservers, Transcript


def samples(metrics: Metrics) -> dict:
    import asyncio

    text = asyncio.run(metrics.render()).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_dsn_class_is_class_and_subject_and_bounded():
    assert dsn_class("5.1.1") == "5.1" and dsn_class("4.4.1") == "4.4" and dsn_class("2.0.0") == "2.0"
    assert dsn_class("5.7.27") == "5.7" and dsn_class("5.1.10") == "5.1" and dsn_class("4.0.000") == "4.0"
    for odd in ("", "9.9.9", "5.1", "5.1.1 text", "x.y.z", "5.1234.1", "5.8.1", "5.999.1", "5.01.1", "5.12.1",
                "5.\u0661.1", "5.1.\u0661", "3.1.1"):
        assert dsn_class(odd) == "other"
    # a remote server chooses the code: whatever it says, RFC 3463's 24 classes.subjects and "other"
    assert len({dsn_class(f"{c}.{s}.{d}") for c in range(10) for s in range(1000) for d in (0, 1, 99)}) == 25


def test_buckets_are_cumulative_and_upper_inclusive():
    b = Buckets("t_seconds", "test", (1, 5), ("kind",))
    for value in (0.5, 1, 1.5, 5, 7):
        b.observe(value, "a")
    [family] = [b.family()]
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("t_seconds_bucket", "1.0")] == 2  # 0.5 and exactly 1
    assert got[("t_seconds_bucket", "5.0")] == 4
    assert got[("t_seconds_bucket", "+Inf")] == 5
    assert got[("t_seconds_count", None)] == 5 and got[("t_seconds_sum", None)] == 15.0


def test_mail_events_count_by_transport_status_and_class():
    clock = VirtualClock(1000.0)
    m = Metrics(clock)
    m.mail_event("Q1", "received", {"client": "x[1.2.3.4]"})
    m.mail_event("Q2", "received", {"uid": 0, "sender": "root"})
    m.mail_event("Q1", "queued", {"size": 10})
    m.mail_event("Q1", "sent", {"transport": "smtp", "dsn": "2.0.0", "delay": 3.0, "to": "a@b", "relay": "r"})
    m.mail_event("Q1", "deferred", {"transport": "smtp", "dsn": "4.4.1", "delay": 4.0, "to": "c@d"})
    m.mail_event("Q1", "bounced", {"transport": "", "dsn": "weird", "delay": 9.0, "to": "e@f"})
    m.mail_event("Q1", "message-id", {"message_id": "<x>"})  # not counted
    m.mail_event("Q1", "removed", {})
    got = samples(m)
    assert got[("mailflow_messages_received_total", (("source", "smtpd"),))] == 1
    assert got[("mailflow_messages_received_total", (("source", "pickup"),))] == 1
    assert got[("mailflow_messages_queued_total", ())] == 1
    assert got[("mailflow_messages_removed_total", ())] == 1
    key = (("dsn_class", "2.0"), ("status", "sent"), ("transport", "smtp"))
    assert got[("mailflow_deliveries_total", key)] == 1
    bounced = (("dsn_class", "other"), ("status", "bounced"), ("transport", "none"))
    assert got[("mailflow_deliveries_total", bounced)] == 1
    assert got[("mailflow_queue_residence_seconds_count", ())] == 2  # sent and bounced, not the deferral
    assert got[("mailflow_queue_residence_seconds_sum", ())] == 12.0
    assert [(d.queue_id, d.status, d.time) for d in m.recent] == [("Q1", "sent", 1000.0), ("Q1", "deferred", 1000.0),
                                                                  ("Q1", "bounced", 1000.0)]
    # nothing watched: no queue sizes, no sessions open
    assert ("mailflow_queue_messages", (("queue", "hold"),)) not in got
    assert got[("mailflow_smtpd_sessions_open", ())] == 0


def test_session_counter_counts_final_replies_and_keeps_no_transcript():
    m = Metrics(VirtualClock())
    t = Transcript(m.sessions, "client[1.2.3.4]", lambda: None)
    t.started()
    t.command(b"EHLO client")
    for line in ("220 hi", "250-mx", "250-PIPELINING", "250 SIZE", "550 5.1.1 no", b"221 2.0.0 bye"):
        t.reply(line)
    assert t.lines == [] and t.omitted == 0
    got = samples(m)
    assert got[("mailflow_smtpd_sessions_total", ())] == 1
    assert got[("mailflow_smtpd_replies_total", (("code", "250"),))] == 1
    assert got[("mailflow_smtpd_replies_total", (("code", "550"),))] == 1
    assert got[("mailflow_smtpd_replies_total", (("code", "221"),))] == 1


def test_session_observers_tell_each_and_keep_the_most_lines():
    m = Metrics(VirtualClock())
    book = TranscriptBook(limit=10, line_limit=50, byte_limit=4096)
    both = SessionObservers(book, m.sessions)
    assert both.line_limit == 50 and both.byte_limit == 4096
    t = Transcript(both, "client[1.2.3.4]", lambda: None)
    t.started()
    t.command(b"MAIL FROM:<a@b>")
    t.reply("250 2.1.0 Ok")
    t.queued("QID")
    assert book.get("QID").lines == (("C", "MAIL FROM:<a@b>"), ("S", "250 2.1.0 Ok"))
    assert samples(m)[("mailflow_smtpd_replies_total", (("code", "250"),))] == 1


def test_token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# operators\n\nops: 0123456789abcdef0123\n  prometheus:abcdefabcdefabcdef \n0123456789ABCDEF\n")
    assert read_tokens(str(path)) == {"ops": "0123456789abcdef0123", "prometheus": "abcdefabcdefabcdef",
                                      "admin": "0123456789ABCDEF"}
    for text, reason in (("ops:short\n", "line 1: a token needs at least 16"), ("# nothing\n", "no token"),
                         ("a b:0123456789abcdef\n", "one word"),
                         ("x:0123456789abcdef\nx:0123456789abcdeg\n", "named twice")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=reason) as e:
            read_tokens(str(path))
        assert e.value.key == "admin.token_file"
    with pytest.raises(ConfigError, match="cannot read"):
        read_tokens(str(tmp_path / "missing"))


def test_loopback_names():
    for host in ("127.0.0.1:8026", "127.0.0.2", "localhost:8026", "[::1]:8026", "LOCALHOST"):
        assert is_loopback_host(host.lower()), host
    for host in ("evil.example:8026", "10.0.0.1:8026", "[::]:8026", "127.0.0.1.evil.example", ""):
        assert not is_loopback_host(host), host
    assert not beyond_loopback("127.0.0.1:8026") and not beyond_loopback("[::1]:1")
    assert beyond_loopback("0.0.0.0:8026") and beyond_loopback("mx.example:8026")


def test_secrets_are_redacted_but_files_named():
    assert redacted("smtp.sasl_password_maps", ("inline:{a=b:c}", "texthash:/etc/pw")) == ["inline:<redacted>",
                                                                                          "texthash:/etc/pw"]
    assert redacted("smtpd.sasl_user_maps", ("static:{x}",)) == ["static:<redacted>"]
    assert redacted("some_password", "hunter2") == "<redacted>"
    assert redacted("some_password", "") == ""
    assert redacted("relayhost", "[mx]:25") == "[mx]:25"
    assert redacted("accounts.password_min_length", 8) == 8 and redacted("srs.secret_file", "/k") == "/k"
    assert redacted("milter.secret", "s3cr3t") == "<redacted>"


def test_an_unknown_field_is_named_cut_to_100_characters():
    """A field name of up to a megabyte was echoed whole in the 400 (as the queue id once was in the 404)."""
    with pytest.raises(Exception) as info:
        refuse_unknown(["f" * 1_000_000], ["address", "quota"])
    error = json.loads(info.value.text)["error"]  # type: ignore[attr-defined]
    assert error == f"unknown field {'f' * 100!r}… (use address, quota)"
