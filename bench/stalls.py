"""The longest event-loop stall each hostile-but-legal input makes (tests/support/stalls.py's LoopWatch).

    PYTHONPATH=. python bench/stalls.py [SCENARIO ...]     (no name: all of them)

Each scenario starts mailflow in this process (ServerThread, loopback only) with the feature it exercises in its
settings, sends its message(s) over SMTP, waits (bounded) for the queue to empty, and prints the longest stall over
50 ms with what the loop was running then.
"""
from __future__ import annotations

import asyncio
import os
import smtplib
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.milters import Drip, ScriptedMilter, optneg, reply
from tests.support.servers import ServerThread, base_settings, merged
from tests.support.stalls import LoopWatch

LIMIT = 10_240_000
TOP = int(os.environ.get("STALLS_TOP", "4"))  # stalls shown per scenario


def header(fields: str = "") -> str:
    return f"From: a@remote.example\r\nTo: alice@local.test\r\nSubject: t\r\nMessage-ID: <x@remote.example>\r\n{fields}"


def one_long_line() -> str:
    return header() + "\r\n" + "x" * (LIMIT - 2000) + "\r\n"


def short_lines() -> str:
    return header() + "\r\n" + "x\r\n" * ((LIMIT - 2000) // 3)


def many_fields() -> str:
    return header("".join(f"X-F{i}: v\r\n" for i in range(100_000))) + "\r\nbody\r\n"


def folded_field() -> str:
    return header("X-Long: a" + "\r\n b" * 100_000 + "\r\n") + "\r\nbody\r\n"


def nested_mime(depth: int = 10_000) -> str:
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    tail = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
    return header("MIME-Version: 1.0\r\n") + head + "Content-Type: text/plain\r\n\r\nleaf" + tail


def many_parts(parts: int = 50_000) -> str:
    body = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\np{i}\r\n" for i in range(parts)) + "--b--\r\n"
    return header('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n') + "\r\n" + body


def junk_base64() -> str:
    line = "QUJD!!!@@@" * 7 + "\r\n"
    return header('MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n') + \
        "\r\n" + line * ((LIMIT - 4000) // len(line))


SHAPES = {"long-line": one_long_line, "short-lines": short_lines, "many-fields": many_fields,
          "folded-field": folded_field, "nested-mime": nested_mime, "many-parts": many_parts,
          "junk-base64": junk_base64}

BACKTRACK = "/^(a|aa)+$/ REJECT\n/(x+x+)+y/ REJECT\n/^(.*),(.*),(.*),(.*)z/ REJECT\n/b[0-9]+c/ WARN\n"


def checks(tmp: Path, kind: str) -> dict:
    table = tmp / f"checks.{kind}"
    table.write_text(BACKTRACK + "".join(f"/word{i}[a-z]*end/ WARN w{i}\n" for i in range(500)))
    spec = f"{kind}:{table}"
    return {"checks": {"header_checks": [spec], "mime_header_checks": [spec], "body_checks": [spec]}}


def fanout(tmp: Path, lists: int, members: int = 1000, domain: str = "relay.test") -> dict:
    table = tmp / "virtual"
    table.write_text("".join(f"list{i}@local.test " + ",".join(f"u{i}x{j}@{domain}" for j in range(members)) + "\n"
                             for i in range(lists)))
    return {"virtual_alias_maps": [f"texthash:{table}"]}


BOUNCING = {"virtual_alias_maps": ["inline:{ @relay.test=nosuch@local.test }"]}  # local: unknown user, 5.1.1


def counts(server: ServerThread) -> dict:
    """The queue's counts, or {"?": 0} when the server's loop did not answer within 5 s."""
    try:
        return server.counts()
    except TimeoutError:
        return {"?": 0}


def data_payload(message: bytes) -> bytes:
    """The message as DATA sends it, dot-stuffed and ended, made before the watch starts: smtplib's sendmail does
    this in the client's thread with one re.sub, which holds the GIL (250 ms for 50 MB) and stalls the server's loop
    in this process."""
    stuffed = smtplib._quote_periods(message)
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


def send(client: smtplib.SMTP, rcpts: list[str], payload: bytes, mail_options: tuple[str, ...]) -> dict:
    """smtplib's sendmail, the DATA payload made already: {refused recipient: reply}."""
    client.ehlo()
    code, text = client.mail("a@remote.example", list(mail_options))
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, text, "a@remote.example")
    refused = {}
    for rcpt in rcpts:
        code, text = client.rcpt(rcpt)
        if code not in (250, 251):
            refused[rcpt] = (code, text)
    if len(refused) == len(rcpts):
        raise smtplib.SMTPRecipientsRefused(refused)
    code, text = client.docmd("DATA")
    if code != 354:
        raise smtplib.SMTPDataError(code, text)
    client.send(payload)
    code, text = client.getreply()
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    return refused


def run(name: str, message: str | bytes, overrides: dict, tmp: Path, rcpts: list[str] | None = None,
        settle: float = 120, mail_options: tuple[str, ...] = (), after=None) -> None:
    settings = merged(base_settings(tmp), {"smtpd": {"listen": ["127.0.0.1:0"], "message_size_limit": LIMIT},
                                           "local": {"maildir_base": str(tmp / "mail"),
                                                     "mailbox_size_limit": 0}})
    settings = merged(settings, overrides)
    payload = data_payload(message.encode() if isinstance(message, str) else message)
    server = ServerThread(settings, start_within=120)  # (100 000-line tables are read before it listens)
    watch = LoopWatch(server._loop)
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as client:
            reply = send(client, rcpts or ["alice@local.test"], payload, mail_options)
        if after is not None:
            after(server)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and set(counts(server)) - {"deferred"}:
            time.sleep(0.1)
        delivered = sum(1 for f in (tmp / "mail").rglob("*") if f.is_file() and f.parent.name == "new")
        outcome = f"delivered {delivered}, queue {counts(server)}" if not reply else reply
    except smtplib.SMTPException as e:
        outcome = f"{type(e).__name__}: {e}"[:120]
    finally:
        elapsed = time.monotonic() - started
        watch.close()
        server.stop()
    worst = max(watch.stalls, default=(0.0, "-"))
    print(f"{name:34s} {worst[0] * 1000:8.0f} ms  stalls>50ms={len(watch.stalls):3d}  {elapsed:6.1f} s  {outcome}")
    for seconds, where in sorted(watch.stalls, reverse=True)[:TOP]:
        print(f"    {seconds * 1000:6.0f} ms  {where}", flush=True)


def scenarios():
    for shape, make in SHAPES.items():
        yield f"plain/{shape}", make, lambda tmp: {}
    for kind in ("regexp", "pcre"):
        for shape, make in SHAPES.items():
            yield f"{kind}/{shape}", make, lambda tmp, kind=kind: checks(tmp, kind)


def main(names: list[str]) -> None:
    for name, make, overrides in scenarios():
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, make(), overrides(Path(tmp)), Path(tmp))
    bounces = {"bounce/1000-rcpts": (header() + "\r\nbody\r\n", [f"u{i}@relay.test" for i in range(1000)], ()),
               "bounce/ret-full-10MB": (one_long_line(), ["u@relay.test"], ("RET=FULL",)),
               "bounce/ret-full-short-lines": (short_lines(), ["u@relay.test"], ("RET=FULL",))}
    for name, (message, rcpts, options) in bounces.items():
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, message, BOUNCING, Path(tmp), rcpts, settle=30, mail_options=options)
    for lists, domain in ((10, "relay.test"), (100, "relay.test"), (100, "local.test")):
        name = f"virtual/{lists}x1000" + ("-bouncing" if domain == "local.test" else "")
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, header() + "\r\nbody\r\n", fanout(Path(tmp), lists, domain=domain), Path(tmp),
                [f"list{i}@local.test" for i in range(lists)], settle=20)


class PeerLoop:
    """An event loop in a thread of its own, for a peer (a milter) whose work must not count as mailflow's."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coroutine, within: float = 30):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(within)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def milter(peers: PeerLoop, script: dict) -> dict:
    started = peers.call(ScriptedMilter(script, optneg()).start())
    return {"smtpd": {"milters": [started.spec]}, "milter": {"content_timeout": "600s"}}


def header_edits(count: int) -> bytes:
    return b"".join(reply(b"h", f"X-Edit-{i}\0value {i}\0".encode()) for i in range(count)) + reply(b"a")


def header_changes(count: int) -> bytes:
    """CHGHEADER of fields the message lacks: each is added, after a look through every field."""
    return b"".join(reply(b"m", struct.pack("!I", 1) + f"X-Change-{i}\0v\0".encode()) for i in range(count)) + \
        reply(b"a")


def replaced_body(size: int) -> bytes:
    line = b"y" * 76 + b"\r\n"
    body = line * (size // len(line))
    return b"".join(reply(b"b", body[i:i + 65535]) for i in range(0, len(body), 65535)) + reply(b"a")


def big_tables(tmp: Path, lines: int = 100_000) -> dict:
    (tmp / "virtual").write_text("".join(f"v{i}@local.test u{i}@relay.test\n" for i in range(lines)))
    (tmp / "access.cidr").write_text("".join(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32 REJECT\n"
                                             for i in range(lines)))
    for kind in ("regexp", "pcre"):
        (tmp / f"checks.{kind}").write_text("".join(f"/^X-Spam-{i}: yes/ REJECT\n" for i in range(lines)))
    return {"virtual_alias_maps": [f"texthash:{tmp / 'virtual'}"],
            "smtpd": {"client_restrictions": [f"check_client_access cidr:{tmp / 'access.cidr'}"]},
            "checks": {"header_checks": [f"regexp:{tmp / 'checks.regexp'}"],
                       "body_checks": [f"pcre:{tmp / 'checks.pcre'}"]}}


def reload_same(server: ServerThread) -> None:
    """Mailflow.reload with the configuration in force (its tables read again), as a SIGHUP does."""
    started = time.monotonic()
    asyncio.run_coroutine_threadsafe(server.mf.reload(server.mf.config), server._loop).result(120)
    print(f"    (reload took {time.monotonic() - started:.1f} s)")


def local_settings(tmp: Path, mailbox: str = "Maildir/") -> dict:
    return {"local": {"maildir_base": str(tmp / "mail"), "mailbox_size_limit": 0, "home_mailbox": mailbox}}


def forward_file(tmp: Path, lines: int = 1000) -> dict:
    home = tmp / "mail" / "alice"
    home.mkdir(parents=True)
    (home / ".forward").write_text("".join(f"u{i}@relay.test\n" for i in range(lines)))
    return {}


def alias_of(tmp: Path, members: int = 10_000) -> dict:
    (tmp / "aliases").write_text("alice: " + ", ".join(f"u{i}@relay.test" for i in range(members)) + "\n")
    return {"alias_maps": [f"texthash:{tmp / 'aliases'}"]}


BIG = 50 * 1024 * 1024


def big_message(size: int = BIG - 4000) -> bytes:
    line = b"x" * 998 + b"\r\n"
    return header().encode() + b"\r\n" + line * (size // len(line))


def dkim_keys(tmp: Path, count: int) -> tuple[list, str]:
    """`count` RSA keys of remote.example (2048 bits: signing 8192-bit keys ahead costs minutes) and a zone of them."""
    from tests.support.deliverability import key_zone, make_key, start_zone

    directory = tmp / "keys"
    directory.mkdir(exist_ok=True)
    keys = [make_key(directory, "remote.example", f"s{i}", "rsa") for i in range(count)]
    nameserver, stop = start_zone(key_zone(keys), ad=False)
    STOPS.append(stop)
    return keys, nameserver


STOPS: list = []  # what a scenario started beside the server (a zone), stopped after it


def signing(tmp: Path) -> dict:
    from tests.support.deliverability import dkim_settings

    keys, nameserver = dkim_keys(tmp, 1)
    return {"mynetworks": ["127.0.0.0/8"], "dkim": dkim_settings(tmp / "keys", keys),
            "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1}}


VERIFY_FIELDS = 990  # a header section just under dkim.MAX_HEADER_FIELDS (1 000)


def many_signatures(tmp: Path) -> tuple[bytes, dict]:
    """Five DKIM-Signatures (dkim.MAX_SIGNATURES), each over every field of a header section of VERIFY_FIELDS and
    more names in h= than fields (up to MAX_SIGNED_FIELDS), and a body of 1 MB."""
    import dkim as dkimpy

    keys, nameserver = dkim_keys(tmp, 5)
    names = [f"X-H{i}".encode() for i in range(VERIFY_FIELDS)] + [b"from", b"to", b"subject"]
    message = (header("".join(f"X-H{i}: v{i}\r\n" for i in range(VERIFY_FIELDS))) + "\r\n").encode() + \
        b"y" * 76 + b"\r\n" * 13_000
    for key in keys:
        message = dkimpy.sign(message, key.selector.encode(), key.domain.encode(), key.private,
                              include_headers=names + [b"x-absent"] * (995 - len(names))) + message
    return message, {"sender_auth": {"verify": ["dkim"]},
                     "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1}}


def pipe_to(tmp: Path) -> dict:
    tmp.chmod(0o755)  # (the command runs as nobody)
    script = tmp / "sink.sh"
    script.write_text("#!/bin/sh\ncat > /dev/null\n")
    script.chmod(0o755)
    return {"relay_domains": ["relay.test", "pipe.test"], "transport_maps": ["inline:{pipe.test=sink:}"],
            "pipe": {"sink": {"argv": [str(script)], "flags": "R"}}}


def lmtp_to(tmp: Path) -> dict:
    """A private Dovecot's LMTP (tests/support/dovecot.py) for example.test, stopped after the scenario."""
    from tests.support.dovecot import dovecot_instance, lmtp_route

    instance = dovecot_instance()
    dovecot = instance.__enter__()
    STOPS.append(lambda: instance.__exit__(None, None, None))
    return {"relay_domains": ["relay.test", "example.test"], "transport_maps": lmtp_route(dovecot)}


def txt(name: str, value: str, size: int = 255) -> str:
    strings = " ".join(f'"{value[i:i + size]}"' for i in range(0, len(value), size))
    return f"{name}. 300 IN TXT {strings}\n"


def sender_auth_zone(tmp: Path) -> dict:
    """SPF and DMARC of remote.example at their limits: 10 includes (the lookup limit) of 1 KB records of ip4:
    mechanisms, the last one written as 255 strings, two void lookups, a DMARC record with 100 rua."""
    from tests.support.deliverability import start_zone

    zone = txt("remote.example", "v=spf1 a:void1.remote.example a:void2.remote.example " +
               " ".join(f"include:i{i}.remote.example" for i in range(8)) + " ?all")
    for i in range(8):
        mechanisms = " ".join(f"ip4:10.{i}.{j}.0/24" for j in range(60))
        zone += txt(f"i{i}.remote.example", f"v=spf1 {mechanisms} -all", 4 if i == 7 else 255)
    zone += txt("_dmarc.remote.example", "v=DMARC1; p=reject; " +
                "rua=" + ",".join(f"mailto:r{i}@reports.example" for i in range(100)))
    nameserver, stop = start_zone(zone, ad=False)
    STOPS.append(stop)
    return {"sender_auth": {"verify": ["spf", "dkim", "dmarc"]},
            "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1}}


def arc_chain(tmp: Path, sets: int = 49) -> tuple[bytes, dict]:
    """A message of `sets` ARC sets (RFC 8617's 50 at most, the seal to add making the last), each by fwd.test's
    key, forwarded by the alias alice to a remote address: this host checks the chain and seals it."""
    import dkim as dkimpy

    from tests.support.deliverability import dkim_settings, key_zone, make_key, start_zone

    directory = tmp / "keys"
    directory.mkdir()
    forwarder, own = make_key(directory, "fwd.test", "arc"), make_key(directory, "local.test", "arc")
    nameserver, stop = start_zone(key_zone([forwarder, own]), ad=False)
    STOPS.append(stop)
    message = (header() + "\r\nbody\r\n").encode()
    for i in range(sets):
        ar = b"Authentication-Results: fwd.test; arc=" + (b"pass" if i else b"none") + b"\r\n"
        message = b"".join(dkimpy.arc_sign(ar + message, b"arc", b"fwd.test", forwarder.private, b"fwd.test")) + \
            message
    (tmp / "aliases").write_text("alice: carol@relay.test\n")
    return message, {"alias_maps": [f"texthash:{tmp / 'aliases'}"],
                     "dns": {"nameservers": [nameserver], "timeout": "2s", "tries": 1},
                     "dkim": {"key_table": dkim_settings(directory, [own])["key_table"]},
                     "arc": {"enabled": True, "key": own.name}, "header_size_limit": 1_000_000}


def features(peers: PeerLoop):
    """(name, message, overrides(tmp), recipients, after): each feature the shapes above do not reach."""
    fifty = {"smtpd": {"message_size_limit": BIG}}
    yield "milter/body-50MB", big_message, lambda tmp: merged(milter(peers, {}), fifty), None, None
    yield "milter/10000-header-edits", lambda: header() + "\r\nbody\r\n", \
        lambda tmp: milter(peers, {b"E": header_edits(10_000)}), None, None
    yield "milter/3000-header-changes", lambda: header() + "\r\nbody\r\n", \
        lambda tmp: milter(peers, {b"E": header_changes(3_000)}), None, None
    yield "milter/3000-header-edits", lambda: header() + "\r\nbody\r\n", \
        lambda tmp: milter(peers, {b"E": header_edits(3_000)}), None, None  # (within header_size_limit)
    yield "milter/replace-body-10MB", lambda: header() + "\r\nbody\r\n", \
        lambda tmp: milter(peers, {b"E": replaced_body(LIMIT - 10_000)}), None, None
    yield "milter/slow-replies", lambda: header("".join(f"X-F{i}: v\r\n" for i in range(200))) + "\r\nbody\r\n", \
        lambda tmp: milter(peers, {b"L": Drip(reply(b"c"), 0.002)}), None, None
    yield "reload/100k-line-tables", lambda: header() + "\r\nbody\r\n", big_tables, None, reload_same
    yield "local/alias-10000", lambda: header() + "\r\nbody\r\n", alias_of, None, None
    yield "local/forward-1000", lambda: header() + "\r\nbody\r\n", forward_file, None, None
    yield "local/maildir-50MB", big_message, lambda tmp: merged(local_settings(tmp), fifty), None, None
    yield "local/mbox-50MB", big_message, lambda tmp: merged(local_settings(tmp, "Mailbox"), fifty), None, None
    yield "dkim/sign-10MB-short-lines", short_lines, signing, None, None
    yield "spf-dmarc/limits", lambda: header() + "\r\nbody\r\n", sender_auth_zone, None, None
    yield "pipe/50MB", big_message, lambda tmp: merged(pipe_to(tmp), fifty), ["u@pipe.test"], None
    yield "pipe/10MB-short-lines", short_lines, pipe_to, ["u@pipe.test"], None
    yield "lmtp/50MB", big_message, lambda tmp: merged(lmtp_to(tmp), fifty), ["alice@example.test"], None
    yield "lmtp/10MB-short-lines", short_lines, lmtp_to, ["alice@example.test"], None
    yield "dkim/sign-10MB-long-line", one_long_line, signing, None, None


def main_features(names: list[str]) -> None:
    peers = PeerLoop()
    try:
        for name, make, overrides, rcpts, after in features(peers):
            if names and not any(name.startswith(n) for n in names):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run(name, make(), overrides(Path(tmp)), Path(tmp), rcpts, settle=60, after=after)
        if not names or any("arc/".startswith(n) or n.startswith("arc/") for n in names):
            with tempfile.TemporaryDirectory() as tmp:
                message, overrides = arc_chain(Path(tmp))
                run("arc/check-and-seal-49-sets", message, overrides, Path(tmp), settle=60)
        if not names or any("dkim/verify".startswith(n) or n.startswith("dkim/verify") for n in names):
            with tempfile.TemporaryDirectory() as tmp:
                message, overrides = many_signatures(Path(tmp))
                run("dkim/verify-5-signatures-990-fields", message, overrides, Path(tmp), settle=60)
    finally:
        peers.close()
        for stop in STOPS:
            stop()


if __name__ == "__main__":
    main(sys.argv[1:])
    main_features(sys.argv[1:])


class SilentPeer:
    """A listener on 127.0.0.1 that accepts and never greets: smtp deliveries to it wait (its helo_timeout), so a
    message's other jobs stay waiting at their destination."""

    def __init__(self):
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0), backlog=100)
        self.port = self.sock.getsockname()[1]
        self.held: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            while True:
                self.held.append(self.sock.accept()[0])
        except OSError:
            return

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def on_loop(server: ServerThread, coroutine, within: float = 120):
    return asyncio.run_coroutine_threadsafe(coroutine, server._loop).result(within)


def reload_hold_delete(server: ServerThread) -> None:
    """Once the message's jobs wait at their destination: a reload (its recipients resolved again), a hold (its jobs
    withdrawn at the next tick), then a delete."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and counts(server) != {"active": 1}:
        time.sleep(0.2)
    time.sleep(3)  # (resolved, queued, the first deliveries waiting for a greeting)
    reload_same(server)
    time.sleep(3)
    ids = on_loop(server, server.mf.store.message_ids(queues=["active"]))
    on_loop(server, server.mf.store.hold_messages(ids))
    time.sleep(3)  # (the tick's poll)
    on_loop(server, server.mf.store.delete_messages(ids))


def waiting_fanout(tmp: Path) -> dict:
    peer = SilentPeer()
    STOPS.append(peer.close)
    return merged(fanout(tmp, 100), {"transport_maps": [f"inline:{{relay.test=smtp:[127.0.0.1]:{peer.port}}}"]})


def dead_fanout(tmp: Path) -> dict:
    """relay.test at a port nobody listens on, in two jobs of 50 000: the first kills the destination, the second
    is deferred unattempted."""
    peer = SilentPeer()
    port = peer.port
    peer.close()
    return merged(fanout(tmp, 100), {"transport_maps": [f"inline:{{relay.test=smtp:[127.0.0.1]:{port}}}"],
                                     "queue": {"transport_destination_recipient_limit": {"smtp": 50_000}}})


def dead_fanout_expiring(tmp: Path) -> dict:
    """dead_fanout with no queue lifetime: the first attempt's end returns every recipient (expired) and queues
    the sender's failure notice."""
    return merged(dead_fanout(tmp), {"queue": {"maximal_queue_lifetime": 0}})


def main_many_recipients(names: list[str]) -> None:
    """The stalls left for one message of 100 000 recipients (a reload, a hold, a dead destination) and pipe's forks."""
    lists = [f"list{i}@local.test" for i in range(100)]
    cases = [("virtual/100x1000-reload-hold-delete", waiting_fanout, lists, reload_hold_delete),
             ("virtual/100x1000-dead-2-jobs", dead_fanout, lists, None),
             ("virtual/100x1000-dead-expires", dead_fanout_expiring, lists, None),
             ("pipe/20-recipients", pipe_to, [f"u{i}@pipe.test" for i in range(20)], None)]
    try:
        for name, overrides, rcpts, after in cases:
            if names and not any(name.startswith(n) for n in names):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run(name, header() + "\r\nbody\r\n", overrides(Path(tmp)), Path(tmp), rcpts, settle=30, after=after)
    finally:
        for stop in STOPS:
            stop()
        STOPS.clear()


if __name__ == "__main__":
    main_many_recipients(sys.argv[1:])
