"""Network lists (mailflow.tables.networks) as Postfix's match lists read them: what the configuration refuses
(naming the setting, the file and line, the reason), what `mailflow check-config` reports, and the lookups the
differential test against Postfix (tests/interop/test_networks_vs_postfix.py) cannot make from loopback: by name
(Postfix's namadr_list asks a table the client's name before its address), IPv6, a table that cannot answer;
and that a reload reads a list's files again.
"""
from __future__ import annotations

import pytest

from mailflow.config import config_from_dict, load_config
from mailflow.errors import ConfigError, LookupRetry
from mailflow.tables.networks import NetworkList, check_network_list
from tests.support import SmtpClient, eventually
from tests.unit.test_cli_and_example_config import mailflow


def config_error(tmp_path, text: str) -> ConfigError:
    path = tmp_path / "mailflow.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def test_a_bad_pattern_in_a_file_names_the_setting_the_file_its_line_and_the_reason(tmp_path):
    (tmp_path / "nets").write_text("# trusted\n10.0.0.0/8\n192.0.2.0/24 10.1.2.3/8\n")
    err = config_error(tmp_path, f"[smtpd]\nauthorized_xclient_hosts = ['{tmp_path}/nets']\n")
    assert err.key == "smtpd.authorized_xclient_hosts"
    assert err.reason == (f"{tmp_path}/nets, line 3: non-null host address bits in '10.1.2.3/8', perhaps you "
                          "should use '10.0.0.0/8' instead")


@pytest.mark.parametrize("items, reason", [
    (["/nonexistent/nets"], "open file /nonexistent/nets: No such file or directory"),
    (["!"], "no pattern after '!'"),
    (["mail.example.com"], "host names are not taken"),
    (["sqlite:/etc/nets.cf"], "tables that answer from memory"),
    (["nosuch:/etc/nets"], "is not a lookup table"),
])
def test_what_a_network_list_refuses(tmp_path, items, reason):
    err = config_error(tmp_path, f"mynetworks = {items!r}\n")
    assert err.key == "mynetworks"
    assert reason in err.reason


def test_a_file_that_names_itself_is_refused_not_followed_forever(tmp_path):
    (tmp_path / "loop").write_text(f"{tmp_path}/loop\n")
    reason = config_error(tmp_path, f"mynetworks = ['{tmp_path}/loop']\n").reason
    assert reason == f"{tmp_path}/loop includes itself: {tmp_path}/loop -> {tmp_path}/loop"


def test_the_list_as_configured_keeps_its_patterns_one_by_one():
    assert check_network_list(["!127.0.0.2, [::1]/128 127.0.0.0/8", "cidr:/etc/nets", "[2001:db8::/32]"]) == (
        "!127.0.0.2", "::1/128", "127.0.0.0/8", "cidr:/etc/nets", "2001:db8::/32")


def test_a_table_is_asked_the_client_name_and_with_parent_style_its_parent_domains(tmp_path):
    (tmp_path / "hash").write_text("example.com yes\n192.0.2.9 yes\n")
    parent = NetworkList.from_items([f"texthash:{tmp_path}/hash"], parent_style=True)
    assert parent.holds("198.51.100.1", "mail.Example.COM")
    assert parent.holds("192.0.2.9", "unknown")
    assert not parent.holds("198.51.100.1", "unknown") and not parent.holds("198.51.100.1")
    exact = NetworkList.from_items([f"texthash:{tmp_path}/hash"])  # `.example.com` would be asked, not `example.com`
    assert exact.holds("198.51.100.1", "example.com") and not exact.holds("198.51.100.1", "mail.example.com")


def test_an_exclusion_ends_the_walk_for_a_client_it_matches_ipv6_and_mapped_addresses_too(tmp_path):
    (tmp_path / "cidr").write_text("2001:db8::/32 x\n")
    networks = NetworkList.from_items([f"!cidr:{tmp_path}/cidr", "[2001::]/16", "192.0.2.0/24"])
    assert not networks.holds("2001:db8::1")
    assert networks.holds("2001:dead::1")
    assert networks.holds("::ffff:192.0.2.7")
    assert not networks.holds("not an address")


def test_a_table_that_cannot_answer_is_an_error_for_the_relay_check_and_no_for_an_exemption(tmp_path):
    networks = NetworkList.from_items([f"cidr:{tmp_path}/missing", "192.0.2.0/24"])
    with pytest.raises(LookupRetry):
        networks.holds("192.0.2.1")
    assert networks.contains("192.0.2.1") is False


def test_an_inline_table_of_several_entries_is_one_pattern():
    networks = NetworkList.from_items(["inline:{ 10.0.0.1=ok, 10.0.0.2=ok }"])
    assert networks.holds("10.0.0.2") and not networks.holds("10.0.0.3")


def test_a_file_of_patterns_that_includes_itself_is_named_once_with_its_chain(tmp_path):
    (tmp_path / "a").write_text(f"{tmp_path}/b\n")
    (tmp_path / "b").write_text(f"10.0.0.0/8 {tmp_path}/a\n")
    with pytest.raises(ValueError) as caught:
        check_network_list([f"{tmp_path}/a"])
    assert str(caught.value) == f"{tmp_path}/a includes itself: {tmp_path}/a -> {tmp_path}/b -> {tmp_path}/a"


def test_check_config_reads_the_tables_of_a_network_list_and_of_its_files(tmp_path):
    (tmp_path / "nets").write_text(f"cidr:{tmp_path}/inner\n")
    (tmp_path / "inner").write_text("192.0.2.0/24\n")  # no value: a bad line
    cfg = tmp_path / "m.toml"
    cfg.write_text(f"mynetworks = ['{tmp_path}/nets', '!cidr:{tmp_path}/missing']\n")
    result = mailflow("check-config", "--config", str(cfg))
    assert result.returncode == 2, result.stdout
    assert f"mynetworks: table cidr:{tmp_path}/inner" in result.stderr and "line 1: no lookup result" in result.stderr
    assert f"mynetworks: table cidr:{tmp_path}/missing" in result.stderr
    (tmp_path / "inner").write_text("192.0.2.0/24 x\n")
    (tmp_path / "missing").write_text("")
    assert mailflow("check-config", "--config", str(cfg)).returncode == 0


async def relay_reply(port: int) -> str:
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<s@example.org>"):
        assert (await client.cmd(command)).code == 250
    reply = (await client.cmd("RCPT TO:<r@remote.example>")).text
    await client.close()
    return reply


async def test_a_file_of_patterns_is_read_again_at_a_reload(mailflow_server, tmp_path):
    (tmp_path / "nets").write_text("127.0.0.0/8\n")
    mf = await mailflow_server(mynetworks=[f"{tmp_path}/nets"],
                               smtpd={"relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"]})
    port = mf.smtp_addresses[0][1]
    assert (await relay_reply(port)).startswith("250 ")
    (tmp_path / "nets").write_text("!127.0.0.1\n127.0.0.0/8\n")
    assert (await relay_reply(port)).startswith("250 "), "read at load and at reload, as Postfix reads it at start"
    await mf.reload(config_from_dict(mf.config.model_dump()))
    assert await relay_reply(port) == "554 5.7.1 <r@remote.example>: Relay access denied"


async def test_a_mynetworks_table_that_cannot_answer_defers_the_relay_check_as_postfix_does(mailflow_server, tmp_path):
    (tmp_path / "nets").write_text("127.0.0.2 x\n")
    mf = await mailflow_server(mynetworks=[f"cidr:{tmp_path}/nets"],
                               smtpd={"relay_restrictions": ["permit_mynetworks", "reject_unauth_destination"]})
    port = mf.smtp_addresses[0][1]
    assert await relay_reply(port) == "554 5.7.1 <r@remote.example>: Relay access denied"
    (tmp_path / "nets").write_text("127.0.0.1 x\n127.0.0.0/8\n")  # a line without a value
    reply = await eventually(lambda: _deferred(port), timeout=5, step=0.2)
    assert reply == "451 4.3.0 <r@remote.example>: Temporary lookup failure"


async def _deferred(port: int) -> str | None:
    reply = await relay_reply(port)
    return reply if reply.startswith("451") else None


def test_a_lists_file_table_is_read_when_the_list_is_built(tmp_path):
    """A network list's cidr: file is read with the list (at start, at reload), not by the first client's lookup
    on the event loop: gone right after, the table still answers from what was read."""
    (tmp_path / "nets").write_text("192.0.2.0/24 ok\n")
    networks = NetworkList.from_items([f"cidr:{tmp_path}/nets"])
    (tmp_path / "nets").unlink()
    assert networks.holds("192.0.2.7") and not networks.holds("198.51.100.1")


def test_a_relative_table_in_a_network_list_is_taken_from_the_configuration_files_directory(tmp_path, monkeypatch):
    (tmp_path / "nets.cidr").write_text("192.0.2.0/24 ok\n")
    path = tmp_path / "mailflow.toml"
    path.write_text('mynetworks = ["cidr:nets.cidr", "!cidr:nets.cidr", "127.0.0.0/8"]\n')
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.mynetworks == (f"cidr:{tmp_path}/nets.cidr", f"!cidr:{tmp_path}/nets.cidr", "127.0.0.0/8")
    assert NetworkList.from_items(config.mynetworks).holds("192.0.2.7")


def test_a_file_gone_since_the_check_is_a_configuration_error_naming_the_setting(tmp_path):
    """A /file removed between the configuration's check and the list's build (a start, a reload) fails in a
    configuration error's words, not with a traceback."""
    with pytest.raises(ConfigError) as caught:
        NetworkList.from_items([f"{tmp_path}/gone"], setting="mynetworks")
    assert caught.value.key == "mynetworks"
    assert caught.value.reason == f"open file {tmp_path}/gone: No such file or directory"


def test_a_file_s_lines_are_each_its_own_as_postfix_s_match_list_reads_them(tmp_path):
    """match_list.c reads a /file line by line (no continuation lines): a first line starting with a blank is a line
    of patterns (it was refused as "a continuation line comes first"), and a `#` word ends its own line only."""
    (tmp_path / "nets").write_text("  192.0.2.0/24 # ours\n  198.51.100.0/24\n")
    networks = NetworkList.from_items([f"{tmp_path}/nets"])
    assert networks.holds("192.0.2.7") and networks.holds("198.51.100.7")
