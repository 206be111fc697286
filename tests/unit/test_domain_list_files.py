"""A domain list's `/file/name` (mydestination, relay_domains, virtual_alias_domains, virtual_mailbox_domains), read
as Postfix's match_list(3) reads it (match_list.c, match_list_parse: each line on its own, `#` lines skipped, a `#`
word ending a line): at load and again at a reload; what the configuration refuses names the setting, the file and
why, never a word of the file (the networks' /files share the reader: tests/unit/test_networks.py)."""
from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailflow import app
from mailflow.app import reload_logged
from mailflow.cli.server import table_problems
from mailflow.config import Config, config_from_dict, load_config
from mailflow.errors import ConfigError
from mailflow.routing.rewrite import Rewriter
from mailflow.syntax import split_outside_braces
from mailflow.tables import match_list
from mailflow.tables.match_list import (COMMENT_AT_END, COMMENT_WARNINGS, DOMAIN_LIST_SETTINGS, PATTERN_FILE_LIMIT,
                                        line_words)
from tests.support import SmtpClient


def refusal(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value


@pytest.mark.parametrize("setting", DOMAIN_LIST_SETTINGS)
def test_a_domain_list_takes_a_file_read_line_by_line_as_postfix_s_match_list(tmp_path, setting):
    (tmp_path / "more").write_text("more.example\n")
    (tmp_path / "list").write_text(f"  first.example\n# a comment line\nA.example, b.example #c.example d.example\n"
                                   f"\n\t{tmp_path}/more\r\n")
    config = config_from_dict({setting: [f"{tmp_path}/list", "last.example"]})
    assert getattr(config, setting) == ("first.example", "a.example", "b.example", "more.example", "last.example")
    assert config.model_dump()[setting] == (f"{tmp_path}/list", "last.example")  # (as configured: `config show`)


@pytest.mark.parametrize("content, reason", [
    (None, "open file {f}: No such file or directory"),
    ("{f}\n", "{f} includes itself: {f} -> {f}"),
    ("example.org !example.com\n", "{f}, line 1: an exclusion ('!'): mailflow's domain lists have none"),
    ("example.org {{\n", "{f}, line 1: unbalanced '{{'"),
    ("root:$y$SECRETHASH:19000:0:99999:7:::\n", "{f}, line 1: a word is not a domain name"),
    (".SECRET.example\n", "{f}, line 1: a word: this is an exact list"),
    ("x" * (PATTERN_FILE_LIMIT + 1), "{f}: the files of one list may hold 4 MB in all"),
])
def test_a_file_the_list_cannot_take_is_refused_naming_the_setting_and_the_file_not_its_words(tmp_path, content,
                                                                                              reason):
    path = tmp_path / "list"
    if content is not None:
        path.write_text(content.format(f=path) if content.endswith("\n") else content)
    err = refusal({"mydestination": [str(path)]})
    assert err.key == "mydestination" and err.reason.startswith(reason.format(f=path))
    assert "SECRET" not in err.reason


def test_a_virtual_list_s_file_word_that_is_no_table_is_refused_unprinted(tmp_path):
    (tmp_path / "shadow").write_text("root:$y$SECRETHASH:19000\n")
    err = refusal({"virtual_mailbox_domains": [f"{tmp_path}/shadow"]})
    assert err.reason == f"{tmp_path}/shadow, line 1: a word that is neither a domain name nor a lookup table " \
                         "mailflow takes"


def test_an_exclusion_of_a_file_or_a_domain_says_the_lists_have_none(tmp_path):
    (tmp_path / "list").write_text("example.org\n")
    assert refusal({"relay_domains": [f"!{tmp_path}/list"]}).reason.startswith(
        f"!{tmp_path}/list: an exclusion ('!'): mailflow's domain lists have none")
    assert refusal({"mydestination": ["!example.org"]}).reason == \
        "'!example.org' is an exclusion ('!'): mailflow's domain lists have none"


async def rcpt_reply(port: int, recipient: str) -> str:
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<s@example.org>"):
        assert (await client.cmd(command)).code == 250
    reply = (await client.cmd(f"RCPT TO:<{recipient}>")).text
    await client.close()
    return reply


async def test_a_domain_list_s_file_is_read_again_at_a_reload(mailflow_server, tmp_path):
    """docker-mailserver rewrites its vhost file when an account is added, then reloads Postfix."""
    (tmp_path / "relayed").write_text("a.example\n")
    mf = await mailflow_server(relay_domains=[f"{tmp_path}/relayed"], mynetworks=[],
                               smtpd={"relay_restrictions": ["reject_unauth_destination"]})
    port = mf.smtp_addresses[0][1]
    assert (await rcpt_reply(port, "r@a.example")).startswith("250 ")
    assert await rcpt_reply(port, "r@b.example") == "554 5.7.1 <r@b.example>: Relay access denied"
    (tmp_path / "relayed").write_text("a.example\nb.example\n")
    await mf.reload(config_from_dict(mf.config.model_dump()))
    assert (await rcpt_reply(port, "r@b.example")).startswith("250 ")


def test_a_long_domain_list_is_looked_up_without_a_scan_of_it(tmp_path):
    """A file makes a list of 200 000 domains easy; a relay_domains check scanned it whole (about 35 ms on the event
    loop at each RCPT, each subdomain form compared): now one set lookup a label."""
    (tmp_path / "relayed").write_text("".join(f"d{n:06d}.example.org\n" for n in range(50_000)))
    listed = f"{tmp_path}/relayed"
    rewriter = Rewriter(config_from_dict({"relay_domains": [listed], "mydestination": [listed]}))
    started = time.perf_counter()
    for _ in range(100):
        assert not rewriter.client_in_relay_domains("mx.a.example.com")
        assert rewriter.client_in_relay_domains("mx.d049999.example.org")
        assert rewriter.resolve_local("d049999.example.org")
    assert time.perf_counter() - started < 0.5


async def test_a_reload_reads_a_long_domain_list_file_off_the_event_loop(mailflow_server, tmp_path, monkeypatch):
    """A reload validates the configuration again (the settings it keeps as they run put back), which reads the
    list's file again: 50 000 domains took about a quarter of a second on the loop, every session held meanwhile.
    The validation runs in a worker thread (no loop running there), and its result is the one put in force."""
    (tmp_path / "relayed").write_text("".join(f"d{n:06d}.example.org\n" for n in range(2_000)))
    mf = await mailflow_server(relay_domains=[f"{tmp_path}/relayed"], mynetworks=[])
    new = config_from_dict(mf.config.model_dump())
    validated_on_loop: list[bool] = []
    validate = app.in_force

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            validated_on_loop.append(True)
        except RuntimeError:
            validated_on_loop.append(False)
        return validate(*args, **kwargs)

    monkeypatch.setattr(app, "in_force", recording)
    await mf.reload(new)
    assert validated_on_loop == [False]
    assert "d001999.example.org" in mf.config.relay_domains


def test_a_table_named_in_a_file_is_checked_as_the_same_table_written_inline(tmp_path):
    """`config check` (and serve) open each file-backed table the lists name, a /file's too: a missing one was taken
    and then failed every RCPT to a non-local domain with 451 4.3.0."""
    (tmp_path / "vdoms").write_text(f"v.example texthash:{tmp_path}/missing\n")
    for listed in ([f"{tmp_path}/vdoms"], ["v.example", f"texthash:{tmp_path}/missing"]):
        problems = table_problems(config_from_dict({"virtual_alias_domains": listed}), "m.toml")
        assert [(p.key, f"{tmp_path}/missing: No such file" in p.reason) for p in problems] == \
            [("virtual_alias_domains", True)], problems


def test_a_relative_table_beside_a_file_is_taken_from_the_configuration_s_directory(tmp_path, monkeypatch):
    """As the server opens it: `config check -c /dir/m.toml` run from / said it could not read vdom.txt."""
    (tmp_path / "vdom.txt").write_text("t.example x\n")
    (tmp_path / "vdoms").write_text("f.example\n")
    (tmp_path / "m.toml").write_text(f'virtual_alias_domains = ["texthash:vdom.txt", "{tmp_path}/vdoms"]\n')
    monkeypatch.chdir("/")
    config = load_config(tmp_path / "m.toml")
    assert table_problems(config, "m.toml") == []
    assert config.model_dump()["virtual_alias_domains"] == (f"texthash:{tmp_path}/vdom.txt", f"{tmp_path}/vdoms")


def test_a_list_with_a_file_shows_its_other_entries_normalised_and_a_changed_list_as_it_is(tmp_path):
    """`config show` gives the path and the other entries as a list without a file gives them; a copy of the
    configuration whose list was changed gives the new list (a reload of it would otherwise read the old file)."""
    (tmp_path / "list").write_text("a.example\n")
    config = config_from_dict({"relay_domains": ["Example.COM.", f"{tmp_path}/list"]})
    assert config.model_dump()["relay_domains"] == ("example.com", f"{tmp_path}/list")
    changed = config.model_copy(update={"relay_domains": ("y.example",)})
    assert changed.model_dump()["relay_domains"] == ("y.example",)
    assert config_from_dict(changed.model_dump()).relay_domains == ("y.example",)


@pytest.mark.parametrize("breaks", ["the file", "a table it names"])
async def test_a_reload_is_refused_when_a_domain_file_or_its_table_cannot_be_read(mailflow_server, tmp_path, breaks):
    """The reload says why and the configuration in force stays, the file's domains still taken."""
    (tmp_path / "vmap").write_text("t.example x\n")
    (tmp_path / "vdoms").write_text(f"v.example texthash:{tmp_path}/vmap\n")
    mf = await mailflow_server(virtual_alias_domains=[f"{tmp_path}/vdoms"], mynetworks=[],
                               virtual_alias_maps=["inline:{r@t.example=r@v.example}"],
                               smtpd={"relay_restrictions": ["reject_unauth_destination"]})
    running = mf.config
    if breaks == "the file":
        (tmp_path / "vdoms").unlink()
        (tmp_path / "vdoms").mkdir()
    else:
        (tmp_path / "vmap").unlink()

    def reread() -> Config:  # (what a reload reads: the file, and the tables it names)
        return config_from_dict(running.model_dump())

    with pytest.raises(ConfigError) as refused:
        await mf.reload(reread())
    assert refused.value.key == "virtual_alias_domains"
    assert not await reload_logged(mf, reread)
    assert mf.config is running
    assert (await rcpt_reply(mf.smtp_addresses[0][1], "r@t.example")).startswith("250 ")


def test_a_comment_ending_a_line_of_a_file_is_a_warning_naming_the_file_and_line_not_its_words(tmp_path):
    """Postfix 3.7 logs `LIST: comment at end of line is not supported: …` and drops the rest of the line (a domain
    after the `#` is not in the list): mailflow drops it too, and says so where its warnings go (config check, the
    start's and a reload's log)."""
    (tmp_path / "list").write_text("a.example #SECRET b.example\nc.example\n")
    (tmp_path / "nets").write_text("# a comment line\n10.0.0.0/8, #office\n")
    config = config_from_dict({"relay_domains": [f"{tmp_path}/list"], "mynetworks": [f"{tmp_path}/nets"]})
    assert config.relay_domains == ("a.example", "c.example")
    assert config.warnings() == [f"relay_domains: {tmp_path}/list, line 1: {COMMENT_AT_END}",
                                 f"mynetworks: {tmp_path}/nets, line 2: {COMMENT_AT_END}"]
    assert config_from_dict(config.model_dump()).warnings() == config.warnings()  # (a reload's configuration)


SMALL_LIMIT = 1000  # (PATTERN_FILE_LIMIT in these tests: the files stay small)


def test_a_file_named_twice_in_a_list_counts_once_against_its_budget(tmp_path, monkeypatch):
    """Postfix reads it twice; the bytes a list may read (4 MB) are spent by distinct files (a 2.6 MB file named
    twice was refused), however it is named (through another file too)."""
    monkeypatch.setattr(match_list, "PATTERN_FILE_LIMIT", SMALL_LIMIT)
    (tmp_path / "big").write_text("".join(f"d{n:03d}.example.org\n" for n in range(SMALL_LIMIT * 2 // 3 // 17)))
    (tmp_path / "names-big").write_text(f"{tmp_path}/big\n")
    config = config_from_dict({"relay_domains": [f"{tmp_path}/big", f"{tmp_path}/names-big", f"{tmp_path}/big"]})
    assert len(config.relay_domains) == 3 * (SMALL_LIMIT * 2 // 3 // 17)


def test_the_files_of_a_network_list_share_the_domain_lists_budget(tmp_path, monkeypatch):
    """One PATTERN_FILE_LIMIT, one meaning: the bytes of the /files of one list, in all (it was each file's for a
    network list)."""
    monkeypatch.setattr(match_list, "PATTERN_FILE_LIMIT", SMALL_LIMIT)
    half = "".join(f"10.0.{n >> 8}.{n & 255}\n" for n in range(SMALL_LIMIT // 2 // 9 + 1))
    (tmp_path / "a").write_text(half)
    (tmp_path / "b").write_text(half)
    assert len(half) < SMALL_LIMIT
    err = refusal({"mynetworks": [f"{tmp_path}/a", f"{tmp_path}/b"]})
    assert err.key == "mynetworks" and err.reason.startswith(f"{tmp_path}/b: the files of one list may hold ")


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet="ab#, \t\r\x0b\x1c\u3000.", max_size=16))
def test_a_line_without_braces_splits_as_the_brace_aware_split(line):
    """The fast path for lines without `{` (a 200 000-domain file validated in a fraction of the time) gives the
    same words."""
    words = split_outside_braces(line)
    assert line_words(line) == words[:next((i for i, w in enumerate(words) if w.startswith("#")), len(words))]


def test_comments_ending_many_lines_of_a_file_are_counted_past_the_first_few(tmp_path):
    """Each line a comment ended was one warning, logged at every start and reload: a 200 000-line file of
    `domain # note` lines wrote 200 000 lines into the server's one log each time (Postfix warns per line too, but
    in its own process). A file says it for its first COMMENT_WARNINGS lines, in Postfix's words, then once how
    many more; a file named twice is counted once."""
    (tmp_path / "list").write_text("".join(f"d{n}.example # note\n" for n in range(1, 1001)) + "plain.example\n")
    (tmp_path / "few").write_text("a.example # x\nb.example\n")
    config = config_from_dict({"relay_domains": [f"{tmp_path}/list", f"{tmp_path}/few", f"{tmp_path}/list"]})
    assert len(config.relay_domains) == 2004  # (every word before a comment is read, the list's twice)
    assert config.warnings() == [
        *(f"relay_domains: {tmp_path}/list, line {n}: {COMMENT_AT_END}" for n in range(1, COMMENT_WARNINGS + 1)),
        f"relay_domains: {tmp_path}/list: {1000 - COMMENT_WARNINGS} more lines end in a comment, not read after it "
        f"(not logged one by one: the first {COMMENT_WARNINGS} are)",
        f"relay_domains: {tmp_path}/few, line 1: {COMMENT_AT_END}"]


def test_one_comment_ended_line_past_the_first_few_is_counted_in_the_singular(tmp_path):
    (tmp_path / "list").write_text("".join(f"d{n}.example # note\n" for n in range(COMMENT_WARNINGS + 1)))
    config = config_from_dict({"relay_domains": [f"{tmp_path}/list"]})
    assert config.warnings()[-1] == (f"relay_domains: {tmp_path}/list: 1 more line ends in a comment, not read "
                                     f"after it (not logged one by one: the first {COMMENT_WARNINGS} are)")
