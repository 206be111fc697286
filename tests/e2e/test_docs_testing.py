"""Every example of docs/testing.md runs as written: a block whose first line is `# script` is run as a
program; a block whose first line names a test file (`# test_x.py`) is run by pytest (the plugin's fixtures)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
SCRIPTS = [b for b in BLOCKS if b.startswith("# script\n")]
TEST_FILES = [b for b in BLOCKS if re.match(r"# (test_\w+\.py)\n", b)]


def test_the_page_has_examples():
    assert len(SCRIPTS) >= 5 and TEST_FILES


@pytest.mark.parametrize("number", range(len(SCRIPTS)))
def test_script(number, tmp_path):
    path = tmp_path / f"example{number}.py"
    path.write_text(SCRIPTS[number])
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env={"PYTHONPATH": str(DOC.parents[1]), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("number", range(len(TEST_FILES)))
def test_pytest_file(number, pytester):
    source = TEST_FILES[number]
    name = re.match(r"# (test_\w+)\.py\n", source).group(1)
    pytester.makepyfile(**{name: source})
    result = pytester.runpytest("-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == source.count("\ndef test_") and "failed" not in outcomes, \
        result.stdout.str()
