"""JunkCount: Postfix's junk_cmds rule (smtpd.c `junk_cmds++ > var_smtpd_junk_cmd_limit`), shared by smtpd and
`sendmail -bs`."""
from __future__ import annotations

from mailflow.junk_commands import JunkCount


def test_from_the_limit_plus_second_junk_command_on_each_is_an_error():
    count = JunkCount(frozenset({"NOOP", "RSET"}), limit=2)
    assert [count.answered(verb) for verb in ("NOOP", "RSET", "NOOP", "NOOP", "RSET")] == [
        False, False, False, True, True]


def test_only_the_given_verbs_count():
    count = JunkCount(frozenset({"NOOP"}), limit=0)
    assert [count.answered(verb) for verb in ("MAIL", "ETRN", "NOOP", "RCPT", "NOOP")] == [
        False, False, False, False, True]


def test_a_queued_message_forgives_the_junk_so_far():
    count = JunkCount(frozenset({"NOOP"}), limit=1)
    assert [count.answered("NOOP") for _ in range(3)] == [False, False, True]
    count.forgive()
    assert [count.answered("NOOP") for _ in range(3)] == [False, False, True]
