"""The examples of README.md and docs/*.md are checked as written, so that a renamed setting or option cannot leave
a page that lies:

- a ```toml block is a configuration file `mailflow config check` accepts; the files it names (certificates,
  tables, the account database) are the site's own, so a problem that is only "this named file is not here" passes;
- an ```sh block's `mailflow` command lines name a command that exists and options its `--help` lists;
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

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- example: (?P<note>.*?)-->\n)?(?P<indent>[ ]*)```(?P<lang>\w*)\n"
                   r"(?P<body>.*?)^(?P=indent)```", re.S | re.M)
CONTEXT = "goes into a configuration with"
NOT_RUN = "not run:"
MISSING_FILE = re.compile(r"(?:No such file or directory|no such certificate or key file)")


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


@pytest.mark.parametrize("block,words", SHELL_COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_shell_command_exists_with_its_options(block, words):
    leading = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
    command = words[:min(leading, 3)]  # `queue list`, `account domain add`: the longest that has a --help
    while command:
        done = mailflow(*command, "--help")
        if done.returncode == 0:
            break
        command.pop()
    assert command, f"{block}: mailflow {' '.join(words)}: no such command\n{done.stderr}"
    options = [w.split("=")[0] for w in words if w.startswith("-") and w != "-"]
    unknown = [o for o in options if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", done.stdout)]
    assert not unknown, f"{block}: mailflow {' '.join(words)}: {unknown} not in its --help"


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_block_is_run_by_the_docs_test(block):
    if block.not_run:
        compile(block.body, str(block), "exec")
        return
    assert block.page == "docs/testing.md" and re.match(r"# (script|test_\w+\.py)\n", block.body), \
        f"{block}: a Python example must start with `# script` or `# test_NAME.py` (run by tests/e2e/" \
        f"test_docs_testing.py) or be marked `<!-- example: not run: REASON -->`"
