"""The examples of README.md and docs/*.md are checked as written, so that a renamed setting or option cannot leave
a page that lies:

- a ```toml block is a configuration file `mailflow config check` accepts; the files it names (certificates,
  tables, the account database) are the site's own, so a problem that is only "this named file is not here" passes;
- each `mailflow` command line names a command that exists and gives it options and arguments it takes, as the
  command line's own parser (typer's click tree, sendmail's parser) reads them: every line of an ```sh block, and
  each line with a `$ ` prompt in a block of any other kind (a session with its output, docs/queue.md's), the
  command after `sudo`, `docker compose exec SERVICE`, `docker exec CONTAINER`, an image name (`mx`) or a `|`;
- a ```python block is run by tests/e2e/test_docs_testing.py: it starts with `# script` or `# test_NAME.py`;
- a block that is not fenced as ```toml but reads as TOML is refused: fence it so, or mark it.

A block that is a fragment says so in an HTML comment on the line before it:
`<!-- example: goes into a configuration with ... -->` followed by the TOML it goes into (checked together), or
`<!-- example: not run: REASON -->` (a TOML block must still parse, a Python block compile).

All of it runs in this process (config check through typer's test runner): no command is spawned."""
from __future__ import annotations

import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from mailflow.cli.commands import app
from mailflow.sendmail.options import UsageError as SendmailUsageError, parse_args as sendmail_args

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- example: (?P<note>(?:(?!-->).)*)-->\n)?(?P<indent>[ ]*)```(?P<lang>\w*)\n"
                   r"(?P<body>.*?)^(?P=indent)```", re.S | re.M)
CONTEXT = "goes into a configuration with"
NOT_RUN = "not run:"
MISSING_FILE = re.compile(r"(?:No such file or directory|no such certificate or key file)")
CHECKED_LANGUAGES = ("toml", "sh", "python")
PROMPT = "$ "
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


def page_blocks(page: str, text: str) -> list[Block]:
    found = []
    for m in FENCE.finditer(text):
        body = "".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines(keepends=True))
        found.append(Block(page, text.count("\n", 0, m.start("lang")) + 1, m["lang"], body, (m["note"] or "").strip()))
    return found


BLOCKS = [block for page in PAGES for block in page_blocks(page.relative_to(ROOT).as_posix(), page.read_text())]
TOML = [block for block in BLOCKS if block.lang == "toml"]
PYTHON = [block for block in BLOCKS if block.lang == "python"]
UNCHECKED = [block for block in BLOCKS if block.lang not in CHECKED_LANGUAGES]


def test_the_pages_have_examples():
    assert len(TOML) >= 8 and len(PYTHON) >= 5 and len(COMMANDS) >= 35


def test_every_note_is_one_the_checks_know():
    for block in BLOCKS:
        assert not block.note or block.context or block.not_run, f"{block}: unknown note {block.note!r}"


def test_a_note_ends_at_its_own_comment_marker():
    text = "<!-- example: not run: a -->\ntext <!-- x -->\n```toml\na = 1\n```\n"
    assert [block.note for block in page_blocks("p.md", text)] == [""]


@pytest.mark.parametrize("block", UNCHECKED, ids=str)
def test_a_block_not_fenced_as_toml_does_not_read_as_toml(block):
    """Such a block would be checked by nothing: a renamed setting in it would go unnoticed."""
    try:
        table = tomllib.loads(block.body)
    except tomllib.TOMLDecodeError:
        return
    assert block.note or not table, f"{block}: reads as TOML: fence it ```toml, or mark it (module docstring)"


@pytest.mark.parametrize("block", TOML, ids=str)
def test_toml_block_is_a_configuration_config_check_accepts(block, tmp_path, monkeypatch):
    source = f"{block.context}\n{block.body}" if block.context else block.body
    tomllib.loads(source)
    if block.not_run:
        return
    path = tmp_path / "config.toml"
    path.write_text(source)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["config", "check", "--config", str(path)], prog_name="mailflow")
    problems = done.stderr.splitlines()
    site_files = [line for line in problems if MISSING_FILE.search(line) and any(
        name in source for name in re.findall(r"/(?:etc|var|run)/[\w./-]+", line))]
    assert done.exit_code == 0 or (done.exit_code == 2 and problems == site_files), \
        f"{block}:\n{done.stderr}{done.exception or ''}"


def command_lines(block: Block) -> list[list[str]]:
    """Each `mailflow ...` command of a block as words, up to a redirection, pipe or comment: in a shell block
    every line, in another only a line with a `$ ` prompt (the rest is output)."""
    commands = []
    for line in block.body.replace("\\\n", " ").splitlines():  # continued lines joined
        if block.lang != "sh":
            if not line.startswith(PROMPT):
                continue
            line = line.removeprefix(PROMPT)
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if word == "mailflow" and launched(words[:start]):
                rest = words[start + 1:]
                stop = next((i for i, w in enumerate(rest) if w in ("|", ">", "<", "&&", ";")), len(rest))
                commands.append(rest[:stop])
    return commands


def launched(before: list[str]) -> bool:
    """Whether a `mailflow` after the words `before` is the command run: first, after a pipe or sudo, or the
    command of `docker compose exec SERVICE`, `docker exec CONTAINER`, or of an image named `mx`."""
    return (not before or before[-1] in ("|", "sudo", "mx") or before[-3:-1] == ["compose", "exec"]
            or before[-3:-1] == ["docker", "exec"])


COMMANDS = [(block, words) for block in BLOCKS for words in command_lines(block)]


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
    mutated = "$ mailflow queue lisst --json -c mailflow.toml\n"  # a line of docs/queue.md, misspelt
    [(block, words)] = [(b, w) for b in page_blocks("queue.md", f"```\n{mutated}```\n") for w in command_lines(b)]
    assert command_problem(words) == "mailflow queue has no command 'lisst'"


@pytest.mark.parametrize("block,words", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_command_exists_with_its_options(block, words):
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
