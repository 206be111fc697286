"""The examples of README.md and docs/*.md are checked as written, so that a renamed setting or option cannot leave
a page that lies:

- a ```toml block is a configuration file `mailflow config check` accepts; the files it names (certificates,
  tables, the account database) are the site's own, so a problem that is only "this named file is not here" passes;
- an ```sh block's `mailflow` command lines name a command that exists and give it options and arguments it takes,
  as the command line's own parser (typer's click tree, sendmail's parser) reads them, in this process;
- a ```python block is run by tests/e2e/test_docs_testing.py: it starts with `# script` or `# test_NAME.py`.

A block that is a fragment says so in an HTML comment on the line before it:
`<!-- example: goes into a configuration with ... -->` followed by the TOML it goes into (checked together), or
`<!-- example: not run: REASON -->` (a TOML block must still parse, a Python block compile)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.main import get_command

from mailflow.cli.commands import app
from mailflow.sendmail.options import UsageError as SendmailUsageError, parse_args as sendmail_args

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- example: (?P<note>.*?)-->\n)?(?P<indent>[ ]*)```(?P<lang>\w*)\n"
                   r"(?P<body>.*?)^(?P=indent)```", re.S | re.M)
CONTEXT = "goes into a configuration with"
NOT_RUN = "not run:"
MISSING_FILE = re.compile(r"(?:No such file or directory|no such certificate or key file)")
CLI = get_command(app)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    body: str
    note: str  # the HTML comment's words before the block, "" without one

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def context(self) -> str:
        return self.note.removeprefix(CONTEXT).strip() if self.note.startswith(CONTEXT) else ""

    @property
    def not_run(self) -> bool:
        return self.note.startswith(NOT_RUN)


def blocks(lang: str) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] == lang:
                body = "".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines(keepends=True))
                found.append(Block(page.relative_to(ROOT).as_posix(), text.count("\n", 0, m.start("lang")) + 1,
                                   lang, body, (m["note"] or "").strip()))
    return found


TOML = blocks("toml")
SHELL = blocks("sh")
PYTHON = blocks("python")


def mailflow(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailflow", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)


def test_the_pages_have_examples():
    assert len(TOML) >= 8 and len(SHELL) >= 5 and len(PYTHON) >= 5


def test_every_note_is_one_the_checks_know():
    for block in TOML + SHELL + PYTHON:
        assert not block.note or block.context or block.not_run, f"{block}: unknown note {block.note!r}"


@pytest.mark.parametrize("block", TOML, ids=str)
def test_toml_block_is_a_configuration_config_check_accepts(block, tmp_path):
    source = f"{block.context}\n{block.body}" if block.context else block.body
    tomllib.loads(source)
    if block.not_run:
        return
    path = tmp_path / "config.toml"
    path.write_text(source)
    done = mailflow("config", "check", "--config", str(path), cwd=tmp_path)
    problems = done.stderr.splitlines()
    site_files = [line for line in problems if MISSING_FILE.search(line) and any(
        name in source for name in re.findall(r"/(?:etc|var|run)/[\w./-]+", line))]
    assert done.returncode == 0 or (done.returncode == 2 and problems == site_files), f"{block}:\n{done.stderr}"


def command_lines(block: Block) -> list[list[str]]:
    """Each `mailflow ...` command of a shell block as words, up to a redirection, pipe or comment."""
    commands = []
    for line in block.body.replace("\\\n", " ").splitlines():  # continued lines joined
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if word == "mailflow" and (start == 0 or words[start - 1] in ("|", "mx")):
                rest = words[start + 1:]
                stop = next((i for i, w in enumerate(rest) if w in ("|", ">", "<", "&&", ";")), len(rest))
                commands.append(rest[:stop])
    return commands


SHELL_COMMANDS = [(block, words) for block in SHELL for words in command_lines(block)]


def test_the_shell_blocks_have_mailflow_commands():
    assert len(SHELL_COMMANDS) >= 8


def command_problem(words: list[str]) -> str | None:
    """What is wrong with `mailflow WORDS` as the command line's parser reads it (None: nothing): each word up to
    the first option names a group's command, down to a command; that command takes the rest."""
    context = CLI.context_class(CLI, info_name="mailflow")
    command, path = CLI, ["mailflow"]
    rest = list(words)
    while isinstance(command, typer.core.TyperGroup) and rest and not rest[0].startswith("-"):
        found = command.get_command(context, rest[0])
        if found is None:
            return f"{' '.join(path)} has no command {rest[0]!r}"
        command, path = found, [*path, rest.pop(0)]
        context = command.context_class(command, info_name=path[-1], parent=context)
    if path[1:] == ["sendmail"]:  # (handed to its own parser before typer: docs/sendmail.md's options)
        try:
            sendmail_args(rest)
        except SendmailUsageError as e:
            return f"sendmail: {e}"
        return None
    try:
        command.make_context(" ".join(path), rest, parent=context.parent)
    except typer.Exit:
        return None
    except Exception as e:  # (click's UsageError and BadParameter: no such option, argument or choice)
        return f"{' '.join(path)}: {e}"
    return None


def test_an_unknown_command_or_option_is_found():
    """The check once dropped a word it could not resolve and tried again: `account domain addd` passed."""
    assert command_problem(["account", "domain", "add", "example.com"]) is None
    assert command_problem(["account", "domain", "addd", "example.com"]) == \
        "mailflow account domain has no command 'addd'"
    assert command_problem(["account", "usr", "add", "a@example.com"]) == "mailflow account has no command 'usr'"
    assert "No such option: --frm" in command_problem(["queue", "list", "--frm", "a@example.org"])
    assert command_problem(["sendmail", "-t", "-Q"]) is not None
    mutated = "mailflow queue lisst --json -c mailflow.toml\n"  # a docs line, misspelt
    [words] = command_lines(Block("p.md", 1, "sh", mutated, ""))
    assert command_problem(words) == "mailflow queue has no command 'lisst'"


@pytest.mark.parametrize("block,words", SHELL_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_shell_command_exists_with_its_options(block, words):
    problem = command_problem(words)
    assert problem is None, f"{block}: mailflow {' '.join(words)}: {problem}"


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_is_run_by_the_docs_test(block):
    if block.not_run:
        compile(block.body, str(block), "exec")
        return
    assert block.page == "docs/testing.md" and re.match(r"# (script|test_\w+\.py)\n", block.body), \
        f"{block}: a Python example must start with `# script` or `# test_NAME.py` (run by tests/e2e/" \
        f"test_docs_testing.py) or be marked `<!-- example: not run: REASON -->`"
