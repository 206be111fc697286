"""Postfix's count of junk commands (smtpd.c's `junk_cmds`), one rule for smtpd's sessions and `sendmail -bs`;
a leaf, as -bs must not load smtpd.

    JunkCount(verbs, limit)
        .answered(verb) -> bool     one more command answered: True when it counts as an error as well
        .forgive()                  a message was queued: the count starts again

Each answered command of `verbs` is counted (Postfix's SMTPD_CMD_FLAG_LIMIT commands: each caller keeps its own
set, as smtpd offers ETRN and -bs does not), in a transaction too, whatever its reply; from the (limit + 2)th on
each one is an error too, as smtpd.c's `junk_cmds++ > var_smtpd_junk_cmd_limit` compares the count before it
grows. Never raises.
"""
from __future__ import annotations


class JunkCount:
    """The junk commands of one session since its last queued message: see the module doc."""

    __slots__ = ("_verbs", "_limit", "_count")

    def __init__(self, verbs: frozenset[str], limit: int) -> None:
        self._verbs = verbs
        self._limit = limit  # junk_command_limit
        self._count = 0

    def answered(self, verb: str) -> bool:
        """`verb` (upper case) was answered: True when it is one more error (a junk command past the limit)."""
        if verb not in self._verbs:
            return False
        past_limit = self._count > self._limit
        self._count += 1
        return past_limit

    def forgive(self) -> None:
        """A message was queued: the junk commands so far are forgiven (Postfix resets junk_cmds with error_count)."""
        self._count = 0
