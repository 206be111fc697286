"""The Milter codec (MTA side) and the header edits milters ask for, without a socket."""
from __future__ import annotations

import struct
import time

import pytest

from mailflow.filters.edits import edit_header
from mailflow.filters.milter import protocol as p


def test_packets_are_length_prefixed_and_nul_terminated():
    assert p.helo("client.test") == struct.pack("!I", 13) + b"Hclient.test\0"
    assert p.connect("host.test", "192.0.2.1", 25) == struct.pack("!I", 24) + b"Chost.test\0" + b"4" + \
        struct.pack("!H", 25) + b"192.0.2.1\0"
    assert p.connect("unknown", "", 0).endswith(b"unknown\0U")
    assert p.macros(p.MAIL, {"{mail_addr}": "a@b"}) == p.encode(p.MACRO, b"M{mail_addr}\0a@b\0")


def test_decoder_waits_for_whole_packets_and_splits_several():
    decoder = p.Decoder()
    data = p.encode(p.CONTINUE) + p.encode(p.ADDHEADER, b"X-A\0v\0")
    assert decoder.feed(data[:3]) == []
    replies = decoder.feed(data[3:])
    assert [r.command for r in replies] == [p.CONTINUE, p.ADDHEADER] and replies[1].strings() == ["X-A", "v"]
    with pytest.raises(p.ProtocolError):
        p.Decoder().feed(struct.pack("!I", 0))
    with pytest.raises(p.ProtocolError):  # a reply that carries no data, with data (Postfix: a protocol error)
        p.Decoder().feed(p.encode(p.CONTINUE, b"junk"))


def test_a_packet_of_the_largest_size_fed_in_small_pieces_costs_its_length_not_its_length_per_piece():
    """A milter that writes a 1 MB reply 4 bytes at a time: 260 000 pieces, decoded in well under a second of CPU
    (a buffer copied whole at each piece held the loop for 3.6 s); many small packets in one read are taken off in
    turn, and a partial one waits. (The CPU time this process spent, not the time on the wall: on a loaded machine
    the decoding took over 1 s of wall time for its 0.06 s of CPU.)"""
    packet = p.encode(p.ADDHEADER, b"X-Big\0" + b"v" * (p.MAX_PACKET - 8) + b"\0")
    decoder = p.Decoder()
    started = time.process_time()
    replies = [reply for i in range(0, len(packet), 4) for reply in decoder.feed(packet[i:i + 4])]
    assert time.process_time() - started < 0.5
    assert len(replies) == 1 and replies[0].strings() == ["X-Big", "v" * (p.MAX_PACKET - 8)]
    progress = p.encode(p.PROGRESS)
    assert [r.command for r in decoder.feed(progress * 10_000 + progress[:2])] == [p.PROGRESS] * 10_000
    assert decoder.feed(progress[2:]) == [p.Reply(p.PROGRESS)]


def test_negotiation_keeps_only_what_was_offered_and_reads_macro_lists():
    payload = struct.pack("!III", 6, 0x1FF, 0xFFFFFFFF) + struct.pack("!I", 2) + b"{mail_addr} i\0"
    n = p.Negotiated.from_reply(p.Reply(p.OPTNEG, payload))
    assert n.actions == p.OFFERED_ACTIONS and n.protocol == p.OFFERED_PROTOCOL  # rspamd's extra bits dropped
    assert not n.answers(p.RCPT) and n.skips(p.HELO)
    assert n.macros[p.MAIL] == {"mail_addr", "i"}
    with pytest.raises(p.ProtocolError):
        p.Negotiated.from_reply(p.Reply(p.CONTINUE))


def test_macro_lists_are_split_on_commas_and_blanks_and_the_last_list_of_a_stage_wins_as_in_milter8():
    """milter8 keeps the last SETSYMLIST list given for a stage (an empty one: the stage's defaults) and splits
    its names with mystrtok's ", \\t\\r\\n"; a list of separators only is no macros."""
    def lists(*pairs: tuple[int, bytes]) -> dict:
        payload = struct.pack("!III", 6, 0, 0) + b"".join(struct.pack("!I", s) + n + b"\0" for s, n in pairs)
        return p.Negotiated.from_reply(p.Reply(p.OPTNEG, payload)).macros
    assert lists((3, b"{rcpt_addr},i")) == {p.RCPT: {"rcpt_addr", "i"}}
    assert lists((2, b"{mail_addr}"), (2, b"")) == {}
    assert lists((2, b""), (2, b"i")) == {p.MAIL: {"i"}}
    assert lists((2, b" ,\t")) == {p.MAIL: frozenset()}


def test_a_negotiation_of_the_largest_size_in_tiny_macro_lists_costs_its_length_not_its_square():
    """A milter's OPTNEG of 1 MB made of 200 000 five-byte lists (a stage number and an empty name): read in well
    under a second of CPU, as the event loop cannot wait for it (taking each list off a copy of the rest held the
    loop about 10 s per negotiation, that is per SMTP session); what it says is still read (the last list of a
    stage wins)."""
    lists = (struct.pack("!I", 9) + b"\0") * ((p.MAX_PACKET - 13) // 5 - 1) + struct.pack("!I", 2) + b"i\0"
    payload = struct.pack("!III", 6, 0, 0) + lists
    started = time.process_time()
    negotiated = p.Negotiated.from_reply(p.Reply(p.OPTNEG, payload))
    assert time.process_time() - started < 0.5
    assert negotiated.macros == {p.MAIL: {"i"}}


def test_a_macro_list_keeps_its_first_names_once_each_and_says_when_it_had_more():
    """A milter's OPTNEG of 1 MB of names in one stage's list: the first MACRO_NAMES_LIMIT are kept, each once (a
    set, looked up at each event without walking the list), the rest not read; keeping them all held about 15 MB
    of names per SMTP session, and each event walked them all. A later list of the stage replaces a cut one."""
    def negotiated(*pairs: tuple[int, bytes]) -> p.Negotiated:
        payload = struct.pack("!III", 6, 0, 0) + b"".join(struct.pack("!I", s) + n + b"\0" for s, n in pairs)
        return p.Negotiated.from_reply(p.Reply(p.OPTNEG, payload))
    many = b",".join(b"m%d" % n for n in range(100_000))
    held = negotiated((2, many), (3, b"i," * 300_000), (4, b"i," * 10))
    assert held.macros[p.MAIL] == {f"m{n}" for n in range(p.MACRO_NAMES_LIMIT)}
    assert held.macros[p.RCPT] == held.macros[p.DATA] == {"i"}
    assert held.macro_lists_cut == (2, 3)
    assert negotiated((2, many), (2, b"i")).macro_lists_cut == ()
    assert negotiated((2, b"i," * p.MACRO_NAMES_LIMIT)).macro_lists_cut == ()
    assert held.macro_stages_unknown == ()
    # stages that are none (Postfix: "ignoring unknown macro type N" each): named once each, the first few only
    odd = negotiated((9, b"i"), (2, b"i"), (9, b"j"), *((100 + n, b"x") for n in range(50)))
    assert odd.macro_stages_unknown == (9, *range(100, 100 + p.UNKNOWN_STAGES_KEPT - 1))
    assert odd.macros == {p.MAIL: {"i"}}


def test_a_milter_asking_for_actions_not_offered_is_refused_as_postfix_does():
    """Postfix's "request mask conflict": the milter is not used (milter_default_action applies), rather than
    being let on with fewer rights than it asked for."""
    payload = struct.pack("!III", 6, p.OFFERED_ACTIONS | 0x400, 0)
    with pytest.raises(p.ProtocolError, match="request mask 0x5ff conflict with MTA request mask 0x1ff"):
        p.Negotiated.from_reply(p.Reply(p.OPTNEG, payload))


def test_header_edits_add_insert_change_and_delete():
    head = b"Subject: a\r\nX-Tag: 1\r\nX-Tag: 2\r\n"
    edited = edit_header(head, [("add", 0, "X-Added", "yes"), ("insert", 0, "X-First", " lead"),
                                ("change", 2, "X-Tag", "two"), ("change", 1, "x-tag", "")])
    assert edited == b"X-First: lead\r\nSubject: a\r\nX-Tag: two\r\nX-Added: yes\r\n"
