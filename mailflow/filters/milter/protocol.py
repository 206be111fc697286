"""The Milter protocol, MTA side, version 6 (sendmail's libmilter, Postfix's milter8.c; draft-adams-milter-
protocol): packets in and out as bytes, no I/O. No maintained Python library speaks the MTA side (pymilter,
python-libmilter, purepythonmilter and kilter.protocol are filter-side frameworks; miltertest is a blocking test
tool that waits for a reply after every step), so it is written here.

    encode(command, payload=b"") -> bytes          one packet: 4-byte length, command byte, payload
    optneg(version, actions, protocol) -> bytes    the negotiation we offer (OFFERED_ACTIONS, OFFERED_PROTOCOL)
    connect(hostname, address, port) / helo(name) / mail(args) / rcpt(args) / header(name, value) / macros(...)
    Decoder().feed(data) -> list[Reply]            complete replies, in order (a partial packet waits)
    Negotiated.from_reply(reply, offered) -> what the milter asked: which events to skip, which get no reply
    Reply(command, payload); `.text()`, `.strings()`, `.index_and_strings()`

Failure behaviour: `ProtocolError` for a packet that cannot be one (too long, empty, a reply that takes no data
with data) or a negotiation that cannot work; the caller treats it like a milter that is down (milter_default_action).
"""
from __future__ import annotations

import itertools
import re
import struct
from dataclasses import dataclass

VERSION = 6
MAX_PACKET = 1 << 20  # a reply longer than this is a broken milter (Postfix: 1 MB)
BODY_CHUNK = 65535  # body bytes per SMFIC_BODY packet

# MTA -> milter commands (SMFIC_*)
ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA, UNKNOWN = (
    b"A", b"B", b"C", b"D", b"E", b"H", b"K", b"L", b"M", b"N", b"O", b"Q", b"R", b"T", b"U")

# milter -> MTA replies (SMFIR_*)
ADDRCPT, DELRCPT, ADDRCPT_PAR, SHUTDOWN, ACCEPT, REPLBODY, CONTINUE, DISCARD, CHGFROM, CONNFAIL, ADDHEADER, \
    INSHEADER, SETSYMLIST, CHGHEADER, PROGRESS, QUARANTINE, REJECT, SKIP, TEMPFAIL, REPLYCODE = (
        b"+", b"-", b"2", b"4", b"a", b"b", b"c", b"d", b"e", b"f", b"h", b"i", b"l", b"m", b"p", b"q", b"r",
        b"s", b"t", b"y")
MODIFICATIONS = (ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM, ADDHEADER, INSHEADER, CHGHEADER, QUARANTINE)
FINAL = (ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, REPLYCODE, SKIP, SHUTDOWN, CONNFAIL)
BARE = (ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, SHUTDOWN, PROGRESS)  # replies that carry no data

# actions the milter may take (SMFIF_*): all of them
OFFERED_ACTIONS = 0x1FF
# protocol steps (SMFIP_*)
NOCONNECT, NOHELO, NOMAIL, NORCPT, NOBODY, NOHDRS, NOEOH, NR_HDR, NOUNKNOWN, NODATA, SKIP_FLAG, RCPT_REJ = (
    0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800)
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT, NR_DATA, NR_UNKN, NR_EOH, NR_BODY, HDR_LEADSPC = (
    0x1000, 0x2000, 0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000)
# Everything but RCPT_REJ (mailflow does not send refused recipients).
OFFERED_PROTOCOL = 0x1FFFFF & ~RCPT_REJ
# the events: (command, "skip" flag, "no reply" flag)
STEPS = {
    CONNECT: (NOCONNECT, NR_CONN), HELO: (NOHELO, NR_HELO), MAIL: (NOMAIL, NR_MAIL), RCPT: (NORCPT, NR_RCPT),
    DATA: (NODATA, NR_DATA), HEADER: (NOHDRS, NR_HDR), EOH: (NOEOH, NR_EOH), BODY: (NOBODY, NR_BODY),
    UNKNOWN: (NOUNKNOWN, NR_UNKN), BODYEOB: (0, 0),
}
# SMFIM_* macro stages of SETSYMLIST
MACRO_STAGES = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}
_MACRO_NAME = re.compile(rb"[^, \t\r\n]+")  # a SETSYMLIST list's names, as milter8's mystrtok(CHARS_COMMA_SP) splits it
UNKNOWN_STAGES_KEPT = 10  # unknown SETSYMLIST stages named in the warning at most (a negotiation may give thousands)
# the most names of one stage's list read, the rest ignored: Postfix keeps the list whole (up to its 1 MB packet) and
# walks it at every event; a list past any macro a milter can be sent would cost each session memory and each event
# time for nothing
MACRO_NAMES_LIMIT = 1000


class ProtocolError(Exception):
    """The milter said something that is not the protocol."""


def encode(command: bytes, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload) + 1) + command + payload


def _z(text: str) -> bytes:
    """A NUL-terminated string (a NUL inside is cut: it cannot travel)."""
    return text.encode("utf-8", "surrogateescape").replace(b"\0", b"") + b"\0"


def optneg(version: int = VERSION, actions: int = OFFERED_ACTIONS, protocol: int = OFFERED_PROTOCOL) -> bytes:
    return encode(OPTNEG, struct.pack("!III", version, actions, protocol))


def macros(stage: bytes, values: dict[str, str]) -> bytes:
    return encode(MACRO, stage + b"".join(_z(k) + _z(v) for k, v in values.items()))


def connect(hostname: str, address: str, port: int) -> bytes:
    """`address` an IPv4/IPv6 address (family 4/6), or "" for an unknown client (family U); `port` 0..65535."""
    if not address or address == "unknown":
        return encode(CONNECT, _z(hostname) + b"U")
    family = b"6" if ":" in address else b"4"
    return encode(CONNECT, _z(hostname) + family + struct.pack("!H", port) + _z(address))


def helo(name: str) -> bytes:
    return encode(HELO, _z(name))


def mail(args: list[str]) -> bytes:
    return encode(MAIL, b"".join(_z(a) for a in args))


def rcpt(args: list[str]) -> bytes:
    return encode(RCPT, b"".join(_z(a) for a in args))


def header(name: str, value: str) -> bytes:
    return encode(HEADER, _z(name) + _z(value))


@dataclass(frozen=True)
class Reply:
    command: bytes
    payload: bytes = b""

    def strings(self) -> list[str]:
        """The payload as NUL-terminated strings."""
        parts = self.payload.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        return [p.decode("utf-8", "replace") for p in parts]

    def text(self) -> str:
        strings = self.strings()
        return strings[0] if strings else ""

    def index_and_strings(self) -> tuple[int, list[str]]:
        """CHGHEADER / INSHEADER: a 4-byte index, then name and value."""
        if len(self.payload) < 4:
            raise ProtocolError(f"short {self.command!r} reply")
        return struct.unpack("!I", self.payload[:4])[0], Reply(self.command, self.payload[4:]).strings()


class Decoder:
    """Bytes from the milter in, complete replies out. Appending to the buffer and taking a packet off its front
    cost what they move, not the buffer's length: a 1 MB packet arriving in small pieces is copied about once (a
    bytes buffer, joined anew at each piece, copied it once per piece)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        buffer = self._buffer
        buffer += data
        replies = []
        while len(buffer) >= 4:
            (length,) = struct.unpack_from("!I", buffer)
            if length < 1 or length > MAX_PACKET:
                raise ProtocolError(f"packet length {length}")
            if len(buffer) < 4 + length:
                break
            with memoryview(buffer) as view:  # the payload copied once (a slice of the bytearray would copy twice)
                command, payload = bytes(view[4:5]), bytes(view[5:4 + length])
            del buffer[:4 + length]  # (a bytearray's front is dropped without moving the rest)
            if command in BARE and length > 1:  # (Postfix: "reply ... was followed by N data bytes")
                raise ProtocolError(f"reply {command!r} followed by {length - 1} data bytes")
            replies.append(Reply(command, payload))
        return replies


def _macro_names(names: bytes) -> tuple[frozenset[str], bool]:
    """The first MACRO_NAMES_LIMIT names of a SETSYMLIST list, without their braces, and whether it had more (the
    rest is not read)."""
    found = [m.group().strip(b"{}").decode("ascii", "replace")
             for m in itertools.islice(_MACRO_NAME.finditer(names), MACRO_NAMES_LIMIT + 1)]
    return frozenset(found[:MACRO_NAMES_LIMIT]), len(found) > MACRO_NAMES_LIMIT


@dataclass(frozen=True)
class Negotiated:
    """What the milter's OPTNEG reply settled: its version, the actions it may take, the protocol flags (what
    it is not sent, what it does not answer) and the macros it asked for per stage (SETSYMLIST: as Postfix 3.7's
    milter8 and MILTER_MACRO_EVAL, a stage not listed, or listed with an empty string, is sent the defaults; one
    listed with separators only is sent none), each a set of at most MACRO_NAMES_LIMIT names (the first ones
    given); `macro_lists_cut`: the SMFIM_* stages whose list had more, the rest ignored; `macro_stages_unknown`: the
    first UNKNOWN_STAGES_KEPT stage numbers given that are no SMFIM_* stage (ignored: Postfix warns of each)."""

    version: int
    actions: int
    protocol: int
    macros: dict[bytes, frozenset[str]]
    macro_lists_cut: tuple[int, ...] = ()
    macro_stages_unknown: tuple[int, ...] = ()

    @classmethod
    def from_reply(cls, reply: Reply, offered_protocol: int = OFFERED_PROTOCOL) -> "Negotiated":
        if reply.command != OPTNEG or len(reply.payload) < 12:
            raise ProtocolError(f"expected an OPTNEG reply, got {reply.command!r}")
        version, actions, protocol = struct.unpack("!III", reply.payload[:12])
        if version < 2:
            raise ProtocolError(f"milter protocol version {version}")
        lists: dict[int, bytes] = {}  # each stage's last list (only it is read: a list is replaced whole)
        unknown: dict[int, None] = {}  # (in the order given, each once, the first UNKNOWN_STAGES_KEPT)
        payload, at = reply.payload, 12
        while len(payload) - at >= 5:  # (read in place: taking each list off a copy of the rest cost its square)
            (stage,) = struct.unpack_from("!I", payload, at)
            end = payload.find(b"\0", at + 4)
            end = len(payload) if end < 0 else end
            if stage in MACRO_STAGES:
                lists[stage] = payload[at + 4:end]
            elif len(unknown) < UNKNOWN_STAGES_KEPT:
                unknown[stage] = None
            at = end + 1
        wanted: dict[bytes, frozenset[str]] = {}
        cut: list[int] = []
        for stage, names in lists.items():
            if names:  # an empty list is no list: that stage's defaults, as Postfix's
                wanted[MACRO_STAGES[stage]], more = _macro_names(names)
                if more:
                    cut.append(stage)
        if actions & ~OFFERED_ACTIONS:  # Postfix: "request mask conflict", the milter is not used
            raise ProtocolError(f"request mask {actions:#x} conflict with MTA request mask {OFFERED_ACTIONS:#x}")
        # a milter may answer with protocol bits that were not offered (rspamd does): only what was offered counts
        return cls(version, actions, protocol & offered_protocol, wanted, tuple(cut), tuple(unknown))

    def skips(self, command: bytes) -> bool:
        return bool(self.protocol & STEPS[command][0])

    def answers(self, command: bytes) -> bool:
        return not self.protocol & STEPS[command][1]

    def may(self, action: int) -> bool:
        return bool(self.actions & action)
