"""The import layering of mailflow/, read from the source (AST), so that it cannot quietly come back.

Layers, lowest first (docs/architecture.md, "Import rules"):
1. leaves: pure vocabularies and libraries (syntax, restriction_vocabulary, pipe_argv, address, errors, tables,
   aliases, dns, message, content, model, clock, passwords, accounts, files, local_macros, ehlo_keywords,
   reply_footer): they import no configuration, stage, transport or routing;
2. the configuration (mailflow.config): it imports leaves only;
3. components: transports import no stage; the routing libraries, stages, app and cli sit above.
No module imports itself back through others (no import cycle), counting imports written inside functions
too: so no such import can exist to dodge a cycle. Imports under `if TYPE_CHECKING:` are not counted: they are
annotations for mypy and never run. Imports inside functions are allowed only where they
save start-up time, listed in FUNCTION_IMPORTS with the reason.

The rules are checked by `Layering`, which reads any package; the last tests feed it a small package that
breaks each rule, to show that the checks do fail.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import mailflow

PACKAGE = Path(mailflow.__file__).parent

LEAVES = (
    "mailflow.syntax", "mailflow.restriction_vocabulary", "mailflow.pipe_argv", "mailflow.address", "mailflow.errors",
    "mailflow.tables", "mailflow.aliases", "mailflow.dns", "mailflow.message", "mailflow.content", "mailflow.model",
    "mailflow.clock", "mailflow.passwords", "mailflow.accounts", "mailflow.files", "mailflow.dsn_parameters",
    "mailflow.junk_commands", "mailflow.local_macros", "mailflow.header_addresses", "mailflow.ehlo_keywords",
    "mailflow.reply_footer", "mailflow.dnsbl_sites", "mailflow.rbl_reply", "mailflow.config_source",
    "mailflow.workers", "mailflow.slices",
)
# What mailflow.config may load (besides itself): leaves only, and of those only these.
CONFIG_MAY_LOAD = ("mailflow", "mailflow.syntax", "mailflow.restriction_vocabulary", "mailflow.pipe_argv",
                   "mailflow.address", "mailflow.errors", "mailflow.tables", "mailflow.aliases",
                   "mailflow.accounts", "mailflow.files", "mailflow.local_macros",
                   "mailflow.header_addresses", "mailflow.message",
                   "mailflow.ehlo_keywords", "mailflow.reply_footer",
                   "mailflow.dnsbl_sites", "mailflow.rbl_reply",
                   "mailflow.config_source")  # (aliases: values read as RFC 822 lists)
ABOVE_LEAVES = ("mailflow.config", "mailflow.filters", "mailflow.stages", "mailflow.transports", "mailflow.routing",
                "mailflow.store", "mailflow.app", "mailflow.cli", "mailflow.sendmail", "mailflow.queue_tools")

# (importing module, imported module) -> why the import is inside a function. Start-up time only: a cycle is
# never a reason (test_no_import_cycle counts these imports too).
FUNCTION_IMPORTS = {
    ("mailflow", "mailflow.app"): "the package's public names load on first use: `import mailflow.<leaf>` (the "
                                  "CLI, sendmail) does not load the whole server",
    ("mailflow", "mailflow.config"): "as above",
    ("mailflow.cli.server", "mailflow.app"): "only `serve` runs the server; loading every stage (aiosmtpd, aiosqlite, "
                                             "aiosmtplib) would slow every other command, sendmail run per message "
                                             "by scripts first",
    ("mailflow.cli.server", "mailflow.routing.router"): "only `address` (and sendmail -bv) routes addresses",
    ("mailflow.cli.server", "mailflow.aliases"): "only `table query/dump --aliases` reads an aliases file's values "
                                                 "as postalias shows them; sendmail and the other commands never do",
    ("mailflow.app", "mailflow.http"): "aiohttp takes a third of a second to import: only a server with an HTTP "
                                       "feature ([sink] enable) loads it, not every `mailflow serve` nor Sink",
    ("mailflow.app", "mailflow.capture.mailpit"): "as above (the capture API's routes are aiohttp handlers)",
    ("mailflow.app", "mailflow.admin"): "as above: only a server with [admin] enable loads the admin listener",
    ("mailflow.app", "mailflow.metrics"): "prometheus_client takes a tenth of a second to import: only a server "
                                          "with [admin] enable counts",
    ("mailflow.testing", "mailflow.testing.sink"): "pytest loads the plugin (mailflow.testing.pytest_plugin) in "
                                                   "every run of every suite in the environment: the server loads "
                                                   "when a test asks for a Sink",
    ("mailflow.testing", "mailflow.testing.destinations"): "as above",
    ("mailflow.testing", "mailflow.capture.mailbox"): "as above",
    ("mailflow.testing.pytest_plugin", "mailflow.testing.sink"): "as above",
    ("mailflow.cli.server", "mailflow.passwords"): "only `auth hash-password` hashes; argon2-cffi's import alone "
                                                   "costs about 20 ms, and sendmail starts once per message",
    ("mailflow.cli.accounts", "mailflow.accounts.database"): "as above: only `account` changes hash passwords",
    ("mailflow.cli.ops", "mailflow.stages.smtpd.frontends"): "only `health` writes a PROXY header; importing it "
                                                             "loads the whole smtpd package",
    ("mailflow.cli.queue", "mailflow.store"): "only the queue commands open the queue database",
    ("mailflow.cli.server", "mailflow.signing.keytables"): "only `check-config` reads the DKIM keys (cryptography)",
    ("mailflow.cli.server", "mailflow.routing.srs"): "only `check-config` reads the SRS secrets",
    ("mailflow.cli.server", "mailflow.stages.smtpd.tls"): "only `check-config` reads the listeners' certificates",
    ("mailflow.cli.server", "mailflow.admin.access"): "only `check-config` reads the admin tokens, and only with "
                                                      "[admin] enable: the admin package loads aiohttp",
    ("mailflow.cli.server", "mailflow.transports.smtp.reuse"): "only `serve` sizes the descriptor limit by the "
                                                               "connection caches (mailflow.transports loads them all)",
    ("mailflow.cli.deliverability", "mailflow.signing"): "only `dkim keygen` makes keys (cryptography, dkimpy)",
    ("mailflow.cli.deliverability", "mailflow.signing.keygen"): "as above",
    ("mailflow.cli.deliverability", "mailflow.signing.keytables"): "as above",
    ("mailflow.cli.deliverability", "mailflow.deliverability.records"): "only `dns-records` reads the DKIM tables",
    ("mailflow.cli.deliverability", "mailflow.deliverability.check"): "only `check-deliverability` asks DNS",
    ("mailflow.cli.deliverability", "mailflow.app"): "the resolver [dns] describes (build_resolver), for the commands "
                                                     "that ask DNS; loading the server would slow sendmail",
    ("mailflow.cli.deliverability", "mailflow.transports"): "`address` builds the SMTP client's TLS policy (MTA-STS)",
    ("mailflow.cli.deliverability", "mailflow.transports.smtp"): "as above",
    ("mailflow.cli.deliverability", "mailflow.transports.smtp.mtasts"): "as above",
    ("mailflow.cli.deliverability", "mailflow.transports.smtp.tls"): "as above",
    ("mailflow.cli.queue", "mailflow.queue_tools"): "as above",
    ("mailflow.cli", "mailflow.cli.commands"): "the command table loads typer and every command's module: `sendmail`, "
                                               "run once per message by scripts, is dispatched before it",
    ("mailflow.cli.submit", "mailflow.cli.common"): "only sendmail's -bp, -q, -bv and -bi are other commands (typer, "
                                                    "the queue tools, the router): deliver and -bs, run once per "
                                                    "message, load none of them",
    ("mailflow.cli.submit", "mailflow.cli.queue"): "as above",
    ("mailflow.cli.submit", "mailflow.config"): "deliver and -bs load the configuration model (pydantic, ~100 ms) "
                                                "only when the server recorded no settings for this exact file "
                                                "(mailflow/sendmail/settings.py)",
    ("mailflow.sendmail.settings", "mailflow.config.load"): "as above: the server's side of the cache loads it",
    ("mailflow.sendmail", "mailflow.sendmail.stdio_smtp"): "deliver mode (-t), the common one, needs no SMTP dialogue "
                                                           "(smtpd's replies, parameter checks, session log)",
    ("mailflow.sendmail.deliver", "mailflow.sendmail.stdio_smtp"): "as above",
    ("mailflow.sendmail.deliver", "mailflow.logs"): "as above: only -bs writes the mail log",
    ("mailflow.cli.submit", "mailflow.cli.server"): "as above",
    ("mailflow.tables.spec", "mailflow.tables.files"): "a file-backed table type's module (the aliases parser, RE2, "
                                                       "sqlite3) loads when a spec names one: the configuration checks "
                                                       "specs at every start of sendmail and opens none of them",
    ("mailflow.tables.spec", "mailflow.tables.regexp"): "as above",
    ("mailflow.tables.spec", "mailflow.tables.pcre"): "as above",
    ("mailflow.tables.spec", "mailflow.tables.cidr"): "as above",
    ("mailflow.tables.spec", "mailflow.tables.accounts"): "as above",
    ("mailflow.tables.spec", "mailflow.tables.sqlite"): "as above",
    ("mailflow.queue_tools.layouts", "mailflow.transports.encode"): "only `queue show` (postcat) prints a body; the "
                                                                    "transports package (SMTP client, dnspython, "
                                                                    "cryptography) costs mailq ~100 ms",
    ("mailflow.tables.files", "mailflow.aliases"): "only alias_maps files are read with the aliases(5) parser (and the "
                                                   "address lists and email modules it loads): not sendmail's tables",
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    line: int
    in_function: bool
    named: bool  # written in the statement (not only an enclosing package the import runs first)


@dataclass
class Layering:
    """The modules of one package and their imports of each other."""

    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)

    @classmethod
    def read(cls, package_dir: Path) -> "Layering":
        root = package_dir.parent
        modules = {_module_name(path, root): path for path in sorted(package_dir.rglob("*.py"))}
        layering = cls(modules)
        for name, path in modules.items():
            layering.imports += _imports_of(name, path, modules)
        return layering

    def edges(self, *, in_functions: bool) -> dict[str, set[str]]:
        """Module -> the modules its imports run (its enclosing packages left out: they are already loading);
        with `in_functions`, the imports written inside functions as well."""
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if not _is_within(imp.source, imp.target) and (in_functions or not imp.in_function):
                graph[imp.source].add(imp.target)
        return graph

    def reaches(self, name: str) -> set[str]:
        """Every module that importing `name` and calling its functions may run: its imports, those written in
        functions included, transitively; and every enclosing package (whose own functions it does not call)."""
        every, module_level = self.edges(in_functions=True), self.edges(in_functions=False)
        seen: set[tuple[str, bool]] = set()
        todo = [(name, True)]
        while todo:
            current, called = todo.pop()
            if (current, called) in seen:
                continue
            seen.add((current, called))
            todo += [(n, True) for n in (every if called else module_level).get(current, ())]
            todo += [(p, False) for p in _parents(current) if p in self.modules]
        return {n for n, _ in seen} - {name}

    def loaded_by_import(self, name: str) -> set[str]:
        """The modules `import name` runs, none of its functions called: module-level imports, transitively, and
        the enclosing packages of each."""
        module_level = self.edges(in_functions=False)
        seen: set[str] = set()
        todo = [name]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo += list(module_level.get(current, ())) + [p for p in _parents(current) if p in self.modules]
        return seen - {name}

    def cycles(self) -> list[list[str]]:
        """The strongly connected groups of more than one module (Tarjan), each sorted; imports inside
        functions count."""
        graph = self.edges(in_functions=True)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        groups: list[list[str]] = []

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for nxt in graph[node]:
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))

        for node in sorted(graph):
            if node not in index:
                visit(node)
        return groups

    def function_imports(self) -> set[tuple[str, str]]:
        return {(imp.source, imp.target) for imp in self.imports
                if imp.in_function and imp.named and not _is_within(imp.source, imp.target)}

    def where(self, source: str, target: str) -> str:
        lines = [imp.line for imp in self.imports if (imp.source, imp.target) == (source, target)]
        return f"{self.modules[source]}:{min(lines)}" if lines else source


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_within(source: str, target: str) -> bool:
    """`target` is `source` itself or one of its enclosing packages."""
    return source == target or source.startswith(target + ".")


def _imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def add(target: str, node: ast.AST, in_function: bool) -> None:
        for candidate in _parents(target) + [target]:
            if candidate in modules:
                found.append(Import(name, candidate, node.lineno, in_function, candidate == target))

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):  # never run: only what its `else` runs counts
                for other in child.orelse:
                    walk(ast.Module(body=[other], type_ignores=[]), in_function)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, in_function)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(child, name, is_package)
                add(base, child, in_function)
                for alias in child.names:
                    if f"{base}.{alias.name}" in modules:
                        add(f"{base}.{alias.name}", child, in_function)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return found


def _type_checking_only(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports for the type checker, never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------- the rules


def config_problems(layering: Layering) -> list[str]:
    allowed = ("mailflow.config",) + tuple(leaf for leaf in CONFIG_MAY_LOAD if leaf != "mailflow")
    return sorted(f"mailflow.config reaches {name}" for name in layering.reaches("mailflow.config")
                  if name != "mailflow" and not _under(name, allowed))


def leaf_problems(layering: Layering) -> list[str]:
    problems = []
    for leaf in LEAVES:
        for name in (n for n in layering.modules if _under(n, (leaf,))):
            problems += [f"{name} reaches {above}" for above in sorted(layering.reaches(name))
                         if _under(above, ABOVE_LEAVES)]
    return problems


def transport_problems(layering: Layering) -> list[str]:
    problems = []
    for name in (n for n in layering.modules if _under(n, ("mailflow.transports",))):
        problems += [f"{name} reaches {stage}" for stage in sorted(layering.reaches(name))
                     if _under(stage, ("mailflow.stages", "mailflow.routing.router"))]
    return problems


def cycle_problems(layering: Layering) -> list[str]:
    return [" <-> ".join(group) for group in layering.cycles()]


def function_import_problems(layering: Layering, allowed: dict) -> list[str]:
    return [f"{layering.where(source, target)}: imports {target} inside a function"
            for source, target in sorted(layering.function_imports() - set(allowed))]


# ---------------------------------------------------------------------------------------------- mailflow


def test_the_configuration_loads_only_leaves():
    assert config_problems(Layering.read(PACKAGE)) == []


def test_leaves_load_no_configuration_stage_transport_or_routing():
    assert leaf_problems(Layering.read(PACKAGE)) == []


def test_transports_load_no_stage_and_not_the_router():
    assert transport_problems(Layering.read(PACKAGE)) == []


def test_no_import_cycle_even_counting_imports_inside_functions():
    assert cycle_problems(Layering.read(PACKAGE)) == []


def test_imports_inside_functions_are_only_the_listed_start_up_savers():
    layering = Layering.read(PACKAGE)
    assert function_import_problems(layering, FUNCTION_IMPORTS) == []
    stale = set(FUNCTION_IMPORTS) - layering.function_imports()
    assert not stale, f"listed but gone (remove from FUNCTION_IMPORTS): {sorted(stale)}"


def test_sendmail_loads_no_stage():
    """`mailflow sendmail` runs once per message (mailers start one each): it shares smtpd's parameter checks
    through mailflow.smtp_parameters, never by loading the smtpd package (0.2-0.4 s per run)."""
    layering = Layering.read(PACKAGE)
    assert sorted(n for n in layering.reaches("mailflow.sendmail") if _under(n, ("mailflow.stages",))) == []
    assert "mailflow.smtp_parameters" in layering.reaches("mailflow.sendmail.stdio_smtp")


def test_the_sendmail_entry_loads_neither_the_command_table_nor_the_server():
    """`mailflow sendmail -t` (and the sendmail, mailq, newaliases links) imports mailflow.cli, whose main() hands
    the arguments to cli.submit: what those two load must leave out the command table (typer, every command's
    module) and the server (stages, store, app, the queue tools, the router), which sendmail's start-up, once per
    message, would pay for (docs/performance.md, "Start-up of the command-line tools")."""
    layering = Layering.read(PACKAGE)
    loaded = layering.loaded_by_import("mailflow.cli") | layering.loaded_by_import("mailflow.cli.submit")
    server = ("mailflow.stages", "mailflow.store", "mailflow.app", "mailflow.queue_tools", "mailflow.routing",
              "mailflow.transports", "mailflow.http", "mailflow.admin")
    commands = ("mailflow.cli.commands", "mailflow.cli.common", "mailflow.cli.server", "mailflow.cli.queue",
                "mailflow.cli.ops", "mailflow.cli.accounts", "mailflow.cli.deliverability")
    assert sorted(n for n in loaded if _under(n, server + commands)) == []
    assert "mailflow.sendmail" in loaded


def test_sendmails_fast_path_loads_neither_pydantic_nor_the_configuration_model():
    """With the settings the server recorded (mailflow/sendmail/settings.py), deliver and -bs never import the
    configuration model: the entry, cli.submit and the sendmail package leave mailflow.config (and so pydantic)
    to the full path, imported inside the function that takes it (docs/performance.md). The modules run in
    tests/e2e/test_sendmail.py show it at run time."""
    layering = Layering.read(PACKAGE)
    loaded = set().union(*(layering.loaded_by_import(name) for name in (
        "mailflow.cli", "mailflow.cli.submit", "mailflow.sendmail", "mailflow.sendmail.settings")))
    assert sorted(n for n in loaded if _under(n, ("mailflow.config",))) == []
    assert "mailflow.sendmail.settings" in loaded


def test_the_queue_tools_load_no_transport_or_stage():
    """mailq and sendmail -bp list the queue: the transports package (the SMTP client, dnspython, cryptography:
    ~100 ms) loads only when `queue show` prints a body."""
    loaded = Layering.read(PACKAGE).loaded_by_import("mailflow.queue_tools")
    assert sorted(n for n in loaded if _under(n, ("mailflow.transports", "mailflow.stages", "mailflow.app"))) == []


def test_every_listed_leaf_exists():
    modules = Layering.read(PACKAGE).modules
    assert [leaf for leaf in LEAVES + CONFIG_MAY_LOAD if leaf not in modules] == []


# ---------------------------------------------------------------------------------------------- the checks fail


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "mailflow" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "mailflow"


def test_the_checks_catch_the_old_layering(tmp_path):
    """config validating through smtpd's vocabulary and pipe's parser inside functions, dns importing config
    back, a transport importing a stage: each rule names its breach."""
    package = write_package(tmp_path, {
        "__init__.py": "",
        "syntax.py": "",
        "dns.py": "from mailflow.config import DnsConfig\n",
        "config/__init__.py": "def check(item):\n    from mailflow.stages.smtpd.restrictions import check_item\n"
                              "    return check_item(item)\n"
                              "def argv(v):\n    from mailflow.transports.pipe import parse_argv\n",
        "stages/__init__.py": "",
        "stages/smtpd/__init__.py": "from mailflow.stages.smtpd.restrictions import Restrictions\n",
        "stages/smtpd/restrictions.py": "from mailflow.dns import NotFound\nfrom mailflow.config import Config\n",
        "transports/__init__.py": "",
        "transports/pipe.py": "from mailflow.stages.smtpd import restrictions\n",
        "typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mailflow.stages.smtpd import X\n"
                    "else:\n    from mailflow.syntax import Y\n",
    })
    layering = Layering.read(package)
    assert "mailflow.config reaches mailflow.stages.smtpd.restrictions" in config_problems(layering)
    assert "mailflow.config reaches mailflow.transports.pipe" in config_problems(layering)
    assert "mailflow.dns reaches mailflow.config" in leaf_problems(layering)
    assert "mailflow.transports.pipe reaches mailflow.stages.smtpd" in transport_problems(layering)
    assert cycle_problems(layering) == ["mailflow.config <-> mailflow.dns <-> mailflow.stages.smtpd "
                                        "<-> mailflow.stages.smtpd.restrictions <-> mailflow.transports.pipe"]
    assert {i.target for i in layering.imports if i.source == "mailflow.typed"} == {
        "mailflow", "mailflow.syntax"}  # (the type checker's import of mailflow.stages.smtpd is not counted)
    assert function_import_problems(layering, {}) == [
        f"{package}/config/__init__.py:2: imports mailflow.stages.smtpd.restrictions inside a function",
        f"{package}/config/__init__.py:5: imports mailflow.transports.pipe inside a function",
    ]


def test_the_checks_pass_a_clean_package(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "",
        "syntax.py": "import re\n",
        "config/__init__.py": "from mailflow.syntax import re\nfrom mailflow import syntax\n",
        "stages/__init__.py": "",
        "stages/cleanup.py": "from mailflow.config import x\nfrom . import other\n",
        "stages/other.py": "from .. import syntax\n",
    })
    layering = Layering.read(package)
    assert (config_problems(layering), cycle_problems(layering), function_import_problems(layering, {})) == ([], [], [])
    assert layering.reaches("mailflow.stages.cleanup") == {"mailflow", "mailflow.stages", "mailflow.config",
                                                         "mailflow.syntax", "mailflow.stages.other"}
