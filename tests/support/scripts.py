"""Shell scripts for the command delivery tests (pipe services, `|command` aliases).

Commands run as `nobody` when the tests run as root, and pytest's tmp_path is private to its owner, so the
scripts live in a fresh directory under the system temp dir that every user may read, with `out/` (sticky,
world-writable) for what the scripts record. `ScriptDir.script(name, body)` writes `#!/bin/sh` + body,
mode 755. `script_dir()` is a context manager that removes the directory afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class ScriptDir:
    def __init__(self, path: Path):
        self.path = path
        self.out = path / "out"

    def script(self, name: str, body: str) -> Path:
        path = self.path / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
        return path

    def read(self, name: str) -> str:
        """A file a script wrote into out/, "" when it is missing."""
        path = self.out / name
        return path.read_text() if path.exists() else ""


@contextmanager
def script_dir():
    path = Path(tempfile.mkdtemp(prefix="mailflow-cmd-"))
    try:
        path.chmod(0o755)
        (path / "out").mkdir()
        (path / "out").chmod(0o1777)
        yield ScriptDir(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
