"""bounce_template_file (mailflow/bounce_templates.py): Postfix's bounce(5) format, and what it refuses."""
from __future__ import annotations

import pytest

from mailflow.bounce_templates import load_templates, parse_templates, template_values
from mailflow.cli.server import template_problems
from mailflow.config import config_from_dict
from mailflow.stages.bounce import NoticeRecipient, build_notice
from mailflow.model import Recipient

GOOD = """\
# comments and blank lines between templates

delay_template = <<EOT
Subject: Still trying
Postmaster-Subject: Still trying (copy)

Your mail waits at $myhostname since more than $delay_warning_time_hours hour(s).
EOT
success_template = <<EOF
Charset: utf-8
Subject: Delivered

Zugestellt. ${mydomain}
EOF
"""


def test_a_template_file_is_parsed_and_expanded():
    templates = parse_templates(GOOD, "bounce.cf")
    delay, success = templates.get("delay"), templates.get("success")
    assert templates.get("failure") is None  # (the built-in one)
    assert (delay.subject, delay.postmaster_subject, delay.from_, delay.charset) == (
        "Still trying", "Still trying (copy)", None, "us-ascii")
    values = template_values(myhostname="mx.test", mydomain="test", delay_warning_time=7200,
                             maximal_queue_lifetime=5 * 86400)
    assert delay.expand(values) == ["Your mail waits at mx.test since more than 2 hour(s)."]
    assert (success.charset, success.expand(values)) == ("utf-8", ["Zugestellt. test"])


def test_a_notice_takes_the_templates_subject_text_and_charset():
    rcpt = NoticeRecipient(Recipient(0, "b@remote.test", "b@remote.test", notify="SUCCESS"), "delivered", "2.0.0",
                           "250 ok")
    raw = build_notice(kind="success", queue_id="Q1", sender="a@example.test", arrival=0.0, envid="", ret="",
                       recipients=[rcpt], original=b"Subject: s\r\n\r\nbody\r\n", reporting_mta="mx.test", now=0.0,
                       notice_id="Q1.success", template=parse_templates(GOOD, "x").get("success"),
                       template_values={"mydomain": "test"})
    assert b"\r\nSubject: Delivered\r\n" in raw
    assert b"Content-Type: text/plain; charset=utf-8\r\n" in raw
    assert b"\r\n\r\nZugestellt. test\r\n\r\n<b@remote.test>: 250 ok\r\n" in raw


@pytest.mark.parametrize("text, words", [
    ("bounce_template = <<EOF\nSubject: x\n\ntext\nEOF\n", "line 1: unknown template name: bounce_template"),
    ("failure_template = <<EOF\nSubject: x\n\ntext\n", "line 1: missing 'EOF' end marker"),
    ("failure_template = text\n", "line 1: failure_template: a template is given as <<MARKER"),
    ("failure_template = <<\n", "line 1: missing end marker after <<"),
    ("failure_template = <<EOF\nReply-To: x\n\ntext\nEOF\n", 'unknown "Reply-To" header label'),
    ("success_template = <<EOF\nPostmaster-Subject: x\n\ntext\nEOF\n", 'inapplicable "Postmaster-Subject"'),
    ("failure_template = <<EOF\nSubject:\n\ntext\nEOF\n", 'empty "Subject" header value'),
    ("failure_template = <<EOF\nSubject: é\n\ntext\nEOF\n", 'non-ASCII "Subject" header value'),
    ("failure_template = <<EOF\nSubject: x\n\nZugestellt: ü\nEOF\n", "8-bit message text: give a Charset"),
    ("failure_template = <<EOF\nSubject: x\n\n\nEOF\n", "missing message text"),
    ("failure_template = <<EOF\nSubject: x\n\nat $myhost\nEOF\n", "unknown macro $myhost"),
    ("failure_template = <<EOF\nCharset: utf-8\rX-Evil: 1\n\ntext\nEOF\n", 'control character in "Charset"'),
    ("failure_template = <<EOF\nSubject: a\rBcc: b\n\ntext\nEOF\n", 'control character in "Subject"'),
    ("failure_template = <<EOF\nFrom: a\x0bb\n\ntext\nEOF\n", 'control character in "From"'),
    ("failure_template = <<EOF\nCharset: utf-8; x=y\n\ntext\nEOF\n", "Charset 'utf-8; x=y' is not a MIME token"),
    ("failure_template = <<EOF\nSubject: x\n\n" + "y" * 999 + "\nEOF\n", "line 1: longer than 998 octets"),
    ("failure_template = <<EOF\nSubject: x\n\nok\na\rb\nEOF\n", "line 2: a bare CR or a NUL"),
])
def test_a_template_file_postfix_would_not_use_is_refused_with_its_line(text, words):
    """Also what would break the notice (a bare CR in a header value or the text, a Charset that is no token: its
    Content-Type; a line past RFC 5322's limit, which also bounds how deep its texts nest)."""
    with pytest.raises(ValueError) as info:
        parse_templates(text, "bounce.cf")
    assert words in str(info.value)


def test_a_template_at_the_limits_is_taken():
    """998 octets of text, a tab in a Subject, 60 nested texts."""
    nested = "${myhostname?{" * 60 + "deep" + "}}" * 60
    template = parse_templates("failure_template = <<EOF\nSubject: a\tb\nCharset: ISO-8859-1\n\n" + "y" * 998 +
                               "\n" + nested + "\nEOF\n", "bounce.cf").get("failure")
    assert template.subject == "a\tb" and template.expand({"myhostname": "h"})[1] == "deep"


def test_config_check_names_the_setting_and_the_file(tmp_path):
    path = tmp_path / "bounce.cf"
    path.write_text("failure_template = <<EOF\nSubject: x\n\nat $myhost\nEOF\n")
    config = config_from_dict({"queue": {"bounce_template_file": str(path)}})
    [problem] = template_problems(config, "mailflow.toml")
    assert (problem.file, problem.key) == ("mailflow.toml", "queue.bounce_template_file")
    assert problem.reason.startswith(f"{path}: line 1: failure_template: unknown macro $myhost")
    assert template_problems(config_from_dict({}), "mailflow.toml") == []
    with pytest.raises(OSError):
        load_templates(str(tmp_path / "missing.cf"))
