"""Differential test of `mailflow sendmail` against Postfix 3.7's sendmail run on a private instance: the same
command lines, the same standard input, to each one's own sendmail (`sendmail -C <etc>`, `mailflow sendmail -C
<config>`).

What is compared per command line: whether it is refused, the reason in the words of Postfix's `fatal:` (or
getopt's) line, and the recipients of what was stored. Postfix's queued mail is read with `postqueue -j` (its
relayhost refuses connections, so the mail stays deferred); mailflow's stays in its maildrop (no server runs).

Documented differences: the exit code of a refusal is 64 (EX_USAGE) for mailflow and 75 for Postfix's sendmail
(whose fatal errors all exit EX_TEMPFAIL, usage errors too; docs/sendmail.md); `-XV` (VERP) is taken by Postfix
and ignored with a warning by mailflow.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mailflow.maildrop import maildrop_names, read_maildrop
from tests.support import eventually, postfix_instance

pytestmark = pytest.mark.interop

COMMON = {"myhostname": "mx.origin.test", "myorigin": "origin.test"}
MESSAGE = b"Subject: probe\n\nbody\n"
# (command line, the recipients stored: None when it is refused)
COMMAND_LINES = [
    (["-Z", "a@x.test"], None),  # a letter Postfix does not know: never mail to the word after it
    (["-4", "a@x.test"], None),
    (["-n", "a@x.test"], None),
    (["-XQ", "a@x.test"], None),
    (["-qS"], None),
    (["-qR"], None),
    (["-t", "-bs"], None),
    (["-t", "-bv"], None),
    (["-bp", "a@x.test"], None),
    (["-bD"], None),
    (["-bh"], []),  # exits 0 at once, reading nothing
    (["-bH", "a@x.test"], []),
    (["-q30m"], []),
    (["-A", "c", "a@x.test"], ["a@x.test"]),  # -A and -e take a value, ignored
    (["-e", "x", "a@x.test"], ["a@x.test"]),
    (["-oem", "-odb", "-U", "-G", "-L", "lbl", "-h", "5", "-p", "smtp:x", "-c", "-x", "-m", "a@x.test"],
     ["a@x.test"]),
]


def fatal_lines(stderr: bytes) -> list[str]:
    """The reasons on sendmail's standard error, without the program name and `fatal: `."""
    lines = stderr.decode(errors="replace").splitlines()
    return [line.removeprefix("sendmail: ").removeprefix("fatal: ") for line in lines if line.startswith("sendmail: ")]


def postfix_queued(pf) -> list[list[str]]:
    listed = pf.run("postqueue", "-j").stdout.decode().splitlines()
    return [[r["address"] for r in json.loads(line)["recipients"]] for line in listed if line.strip()]


def mailflow_stored(maildrop: Path) -> list[list[str]]:
    return [list(read_maildrop(maildrop / name).recipients) for name in maildrop_names(maildrop)]


async def test_command_lines_are_refused_or_taken_as_a_real_postfix_takes_them(write_config, tmp_path):
    (tmp_path / "queue").mkdir()
    config = write_config(tmp_path / "mailflow.toml", **COMMON)
    maildrop = tmp_path / "queue" / "maildrop"
    async with postfix_instance({**COMMON, "relayhost": "[127.0.0.1]:9"}) as pf:
        for args, stored in COMMAND_LINES:
            postfix = subprocess.run(["sendmail", "-C", str(pf.etc), *args], input=MESSAGE, capture_output=True,
                                     timeout=20)
            mailflow = subprocess.run([sys.executable, "-m", "mailflow", "sendmail", "-C", str(config), *args],
                                      input=MESSAGE, capture_output=True, timeout=20)
            assert (postfix.returncode != 0, mailflow.returncode != 0) == (stored is None,) * 2, (args, postfix,
                                                                                                 mailflow)
            if stored is None:
                assert mailflow.returncode == 64 and postfix.returncode == 75
                reason = fatal_lines(mailflow.stderr)[0]
                assert reason in fatal_lines(postfix.stderr), (args, postfix.stderr, mailflow.stderr)
                continue
            if stored:
                await eventually(lambda: postfix_queued(pf), timeout=10, step=0.2, what=f"{args} queued by Postfix")
            else:
                assert not any((pf.root / "queue" / "maildrop").iterdir()), args
            assert postfix_queued(pf) == ([stored] if stored else []), args
            assert mailflow_stored(maildrop) == ([stored] if stored else []), args
            pf.run("postsuper", "-d", "ALL")
            for name in maildrop_names(maildrop):
                (maildrop / name).unlink()
