"""smtpd's Dovecot AUTH back end against scripted auth servers on a unix socket (the real Dovecot is in
tests/interop/test_accounts_dovecot.py): what it sends, how it reads the answers, and that every fault (down,
silent, wrong version, no PLAIN, dropped connection) is 454 4.7.0, never a crash or an accepted login."""
from __future__ import annotations

import asyncio
import contextlib
import base64
import logging
import tempfile
from pathlib import Path

import pytest

from mailflow import status
from mailflow.clock import VirtualClock
from mailflow.stages.smtpd.auth import Authenticator, DovecotBackend, FailureCounter
from mailflow.stages.smtpd.dovecot_auth import (MAX_RETIRED, DovecotAuth, Handshake, HandshakeError, Unavailable,
                                                parse_line)
from tests.support import SmtpClient, eventually

HANDSHAKE = b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t7\nCUID\t1\nCOOKIE\tab\nDONE\n"


class FakeAuthServer:
    """Answers AUTH lines from `users` (login -> password); `hold` makes it answer later, in reverse order;
    `noise`: lines written before each answer."""

    def __init__(self, path: Path, *, handshake: bytes = HANDSHAKE, silent: bool = False, noise: bytes = b""):
        self.path = path
        self.handshake = handshake
        self.silent = silent
        self.noise = noise
        self.users = {"alice@example.test": b"s3cret"}
        self.temporary: set[str] = set()
        self.reasons: dict[str, str] = {}  # login -> the reason= of its FAIL
        self.requests: list[dict[str, str]] = []
        self.hold = 0
        self.delays: dict[str, float] = {}  # login -> seconds its answer waits (each on its own: others go on)
        self.faults: dict[str, str] = {}  # login -> "CONT" (answered with a CONT) or "EOF" (the connection closed)
        self._held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.connections = 0
        self.ended = 0  # connections the client closed
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> "FakeAuthServer":
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def stop(self) -> None:
        for writer in self._writers:  # as a stopping Dovecot does: its connections end too
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.silent:
            await reader.read()
            return
        writer.write(self.handshake)
        while line := await reader.readline():
            words = line.decode().rstrip("\n").split("\t")
            if words[0] != "AUTH":
                continue
            args = dict(w.partition("=")[::2] for w in words[3:])
            self.requests.append({"id": words[1], "mech": words[2], **args})
            _, login, password = base64.b64decode(args["resp"]).split(b"\0")
            name = login.decode()
            if name in self.temporary:
                answer = f"FAIL\t{words[1]}\tuser={name}\ttemp\treason=database down\n"
            elif self.users.get(name) == password:
                answer = f"OK\t{words[1]}\tuser={name}\n"
            else:
                reason = f"\treason={self.reasons[name]}" if name in self.reasons else ""
                answer = f"FAIL\t{words[1]}\tuser={name}{reason}\n"
            fault = self.faults.get(name)
            if fault == "CONT":
                answer = f"CONT\t{words[1]}\t\n"
            if name in self.delays:
                loop = asyncio.get_running_loop()
                if fault == "EOF":
                    loop.call_later(self.delays[name], writer.close)
                else:
                    loop.call_later(self.delays[name], writer.write, answer.encode())
                continue
            self._held.append((writer, self.noise + answer.encode()))
            if len(self._held) > self.hold:
                for w, data in reversed(self._held):
                    w.write(data)
                self._held.clear()
            await writer.drain()
        self.ended += 1


@pytest.fixture
async def socket_dir():
    with tempfile.TemporaryDirectory(prefix="mf-auth-") as d:  # unix socket paths must stay short
        yield Path(d)


def client(path: Path, timeout: float = 2.0) -> DovecotAuth:
    return DovecotAuth(str(path), timeout=timeout, clock=VirtualClock())


async def test_asks_plain_with_the_clients_facts_and_reads_ok_fail_and_temp(socket_dir):
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.temporary.add("bob@example.test")
    dovecot = client(server.path)
    try:
        ok = await dovecot.ask(b"alice@example.test", b"s3cret", secured=True, client_ip="192.0.2.1",
                               local_ip="127.0.0.1")
        bad = await dovecot.ask(b"alice@example.test", b"wrong", secured=False, client_ip="192.0.2.1")
        temp = await dovecot.ask(b"bob@example.test", b"x", secured=True)
    finally:
        await dovecot.close()
        await server.stop()
    assert (ok.login, bad.login, bad.temporary, temp.login, temp.temporary) == (
        "alice@example.test", None, False, None, True)
    assert temp.reason == "database down"
    first, second, _ = server.requests
    assert (first["mech"], first["service"], first["rip"], first["lip"]) == ("PLAIN", "smtp", "192.0.2.1", "127.0.0.1")
    assert "secured" in first and "nologin" in first and "secured" not in second
    assert server.connections == 1  # one connection for every request


async def test_a_failure_is_logged_with_dovecots_reason_as_postfix_logs_it(socket_dir, caplog):
    """Postfix with Dovecot SASL logs Dovecot's reason= (else "(reason unavailable)"), where the Cyrus words
    "authentication failure" were logged and Dovecot's reason was lost."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.reasons["alice@example.test"] = "Account disabled"
    dovecot = client(server.path)
    clock = VirtualClock()
    sasl = Authenticator(clock=clock, failures=FailureCounter(clock, 60), delay=0, delay_limit=0,
                         backend=DovecotBackend(dovecot))
    try:
        with caplog.at_level(logging.WARNING, logger="mailflow.smtpd"):
            for login in (b"alice@example.test", b"bob@example.test"):
                assert (await sasl.check("192.0.2.1", "PLAIN", login, b"wrong")).reply == status.AUTH_FAILED
    finally:
        await dovecot.close()
        await server.stop()
    assert [r.getMessage() for r in caplog.records] == [
        "unknown[192.0.2.1]: SASL PLAIN authentication failed: Account disabled, sasl_username=alice@example.test",
        "unknown[192.0.2.1]: SASL PLAIN authentication failed: (reason unavailable), sasl_username=bob@example.test"]


async def test_requests_in_flight_together_get_their_own_answers(socket_dir):
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.users["carol@example.test"] = b"pw2"
    server.hold = 1  # the second request is answered first
    dovecot = client(server.path)
    try:
        answers = await asyncio.gather(dovecot.ask(b"alice@example.test", b"s3cret", secured=True),
                                       dovecot.ask(b"carol@example.test", b"pw2", secured=True))
    finally:
        await dovecot.close()
        await server.stop()
    assert [a.login for a in answers] == ["alice@example.test", "carol@example.test"]


@contextlib.asynccontextmanager
async def slow_request_waiting(socket_dir, *, alice_delay: float):
    """(server, client, the task of a request Dovecot answers only after 30 s, asked with a 0.3 s timeout and
    waiting): alice's answers come after `alice_delay`; the client and server closed at the end."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.users["slow@example.test"] = b"pw"
    server.delays = {"slow@example.test": 30.0, "alice@example.test": alice_delay}
    dovecot = client(server.path)
    try:
        slow = asyncio.create_task(dovecot.ask(b"slow@example.test", b"pw", secured=True, timeout=0.3))
        await eventually(lambda: server.requests)
        yield server, dovecot, slow
    finally:
        await dovecot.close()
        await server.stop()


async def test_one_request_timing_out_fails_no_other_request_in_flight(socket_dir):
    """Dovecot delays some answers (auth_failure_delay, and up to 15 s for a client IP with failures: its auth
    penalty), past a listener's sasl_timeout: that one session gets 454, and the connection, shared by every
    session, is kept while other requests on it wait for their answers (as each Postfix smtpd has its own, a
    timeout there closes one session's connection only). A connection silent while the one request waited is
    retired: later requests go to a new one, and it is closed once the requests on it are answered."""
    async with slow_request_waiting(socket_dir, alice_delay=0.4) as (server, dovecot, slow):
        other = asyncio.create_task(dovecot.ask(b"alice@example.test", b"s3cret", secured=True))
        with pytest.raises(Unavailable, match="no answer within 0.3s"):
            await slow
        assert (await other).login == "alice@example.test"
        await eventually(lambda: server.ended == 1, timeout=5)  # silent while the one waited: closed after the other
        server.delays = {}
        assert (await dovecot.ask(b"alice@example.test", b"s3cret", secured=True)).login == "alice@example.test"
        assert server.connections == 2


async def test_a_connection_that_answered_others_meanwhile_is_kept_after_a_timeout(socket_dir):
    """The timeout of one request whose answer Dovecot delays, while the connection answers another session: the
    connection is not retired, the next request goes on it (only retirement was tested: always retiring passed)."""
    async with slow_request_waiting(socket_dir, alice_delay=0.05) as (server, dovecot, slow):
        assert (await dovecot.ask(b"alice@example.test", b"s3cret", secured=True)).login == "alice@example.test"
        with pytest.raises(Unavailable, match="no answer within 0.3s"):
            await slow
        assert (await dovecot.ask(b"alice@example.test", b"s3cret", secured=True)).login == "alice@example.test"
        assert (server.connections, server.ended) == (1, 0)


@pytest.mark.parametrize("fault", ["CONT", "EOF"])
async def test_a_fault_on_a_retired_connection_fails_its_own_request_never_the_new_connections(socket_dir, fault):
    """A request still waiting on a retired connection that then sends a CONT or closes: that request is 454,
    and the connection now in use, with another session's request on it, is not touched (the fault closed the
    current connection, whichever it was, and every request on it was 454)."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.users.update({"slow@example.test": b"pw", "odd@example.test": b"pw"})
    server.faults = {"odd@example.test": fault}
    server.delays = {"slow@example.test": 30.0, "odd@example.test": 0.6, "alice@example.test": 0.5}
    dovecot = client(server.path, timeout=3)
    try:
        slow = asyncio.create_task(dovecot.ask(b"slow@example.test", b"pw", secured=True, timeout=0.3))
        await eventually(lambda: server.requests)
        odd = asyncio.create_task(dovecot.ask(b"odd@example.test", b"pw", secured=True))
        with pytest.raises(Unavailable, match="no answer within 0.3s"):
            await slow  # the first connection heard nothing meanwhile: retired
        alice = asyncio.create_task(dovecot.ask(b"alice@example.test", b"s3cret", secured=True))
        with pytest.raises(Unavailable):
            await odd  # at 0.6 s, while alice waits on the second connection
        assert (await alice).login == "alice@example.test"
        assert server.connections == 2
        assert (await dovecot.ask(b"alice@example.test", b"s3cret", secured=True)).login == "alice@example.test"
        assert server.connections == 2  # the second connection is still the one in use
    finally:
        await dovecot.close()
        await server.stop()


async def test_retired_connections_are_capped_the_oldest_closed_with_its_requests_454(socket_dir):
    """Listeners with a short and a long sasl_timeout, a client IP Dovecot never answers (its auth penalty): each
    short request timing out retired the connection, held open until the long request on it ended, one fd per
    timeout (30 rounds: 29 open). At most MAX_RETIRED stay; the oldest is closed and its request is 454 at once."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.users["slow@example.test"] = b"pw"
    server.delays = {"slow@example.test": 30.0}
    dovecot = client(server.path, timeout=3)
    rounds = MAX_RETIRED + 4
    long: list[asyncio.Task] = []
    try:
        for _ in range(rounds):
            long.append(asyncio.create_task(dovecot.ask(b"slow@example.test", b"pw", secured=True, timeout=10)))
            with pytest.raises(Unavailable, match="no answer within 0.1s"):
                await dovecot.ask(b"slow@example.test", b"pw", secured=True, timeout=0.1)
        assert server.connections == rounds
        await eventually(lambda: server.connections - server.ended == MAX_RETIRED, timeout=5)
        closed = long[:rounds - MAX_RETIRED]
        await asyncio.wait(closed, timeout=5)
        assert all(isinstance(t.exception(), Unavailable) and "retired" in str(t.exception()) for t in closed)
        assert not any(t.done() for t in long[rounds - MAX_RETIRED:])
    finally:
        await dovecot.close()
        await asyncio.gather(*long, return_exceptions=True)
        await server.stop()


async def test_a_cont_fails_its_request_alone_and_the_connection_stays(socket_dir):
    """PLAIN with an initial response needs no CONT: one is a fault of that request, not of the connection every
    session shares (it was dropped, and every request in flight on it was 454)."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    server.users["odd@example.test"] = b"pw"
    server.faults = {"odd@example.test": "CONT"}
    server.delays = {"odd@example.test": 0.1, "alice@example.test": 0.3}
    dovecot = client(server.path)
    try:
        alice = asyncio.create_task(dovecot.ask(b"alice@example.test", b"s3cret", secured=True))
        await eventually(lambda: server.requests)
        with pytest.raises(Unavailable, match="unexpected CONT"):
            await dovecot.ask(b"odd@example.test", b"pw", secured=True)
        assert (await alice).login == "alice@example.test"
        assert server.connections == 1
    finally:
        await dovecot.close()
        await server.stop()


async def test_a_down_silent_or_foreign_server_is_unavailable_and_logged_once(socket_dir, caplog):
    caplog.set_level(logging.ERROR, logger="mailflow.smtpd")
    missing = client(socket_dir / "nothing-here")
    for _ in range(3):
        with pytest.raises(Unavailable):
            await missing.ask(b"alice@example.test", b"s3cret", secured=True)
    assert len([r for r in caplog.records if "nothing-here" in r.getMessage()]) == 1  # then once a minute

    silent = await FakeAuthServer(socket_dir / "silent", silent=True).start()
    slow = client(silent.path, timeout=0.2)
    with pytest.raises(Unavailable, match="no answer within 0.2s"):
        await slow.ask(b"alice@example.test", b"s3cret", secured=True)
    await slow.close()
    await silent.stop()

    for handshake, reason in ((b"VERSION\t2\t0\nDONE\n", "protocol version 2"),
                              (b"VERSION\t1\t2\nMECH\tCRAM-MD5\nDONE\n", "no PLAIN mechanism")):
        foreign = await FakeAuthServer(socket_dir / "foreign", handshake=handshake).start()
        refused = client(foreign.path)
        with pytest.raises(Unavailable, match=reason):
            await refused.ask(b"alice@example.test", b"s3cret", secured=True)
        await refused.close()
        await foreign.stop()


async def test_a_restarted_server_is_reconnected_and_a_lost_one_is_454_never_a_login(socket_dir):
    path = socket_dir / "auth"
    server = await FakeAuthServer(path).start()
    failures = FailureCounter(VirtualClock(), 60)
    dovecot = client(path)
    auth = Authenticator(backend=DovecotBackend(dovecot), clock=VirtualClock(), failures=failures, delay=0,
                         delay_limit=0)
    try:
        assert (await auth.check("192.0.2.1", "LOGIN", b"alice@example.test", b"s3cret")).reply == status.AUTH_OK
        await server.stop()
        for _ in range(2):
            outcome = await auth.check("192.0.2.1", "PLAIN", b"alice@example.test", b"s3cret")
            assert (outcome.login, outcome.reply) == (None, status.AUTH_UNAVAILABLE)
        assert failures.recent("192.0.2.1") == 0  # a server fault is not the client's failure
        server = await FakeAuthServer(path).start()
        assert (await auth.check("192.0.2.1", "PLAIN", b"alice@example.test", b"wrong")).reply == status.AUTH_FAILED
        assert failures.recent("192.0.2.1") == 1
    finally:
        await dovecot.close()
        await server.stop()


async def test_a_line_whose_id_is_no_number_is_skipped_and_the_answers_after_it_count(socket_dir):
    """Postfix's xsasl_dovecot reads a reply's id with strtoul and skips a line that is not its request's. Ids that
    are digits to str.isdigit but no int (a superscript two, 5000 digits) ended the reader: every request in flight
    was 454 and the connection dropped. They are skipped, and the answer that follows is read."""
    noise = "OK\t\u00b2\tuser=mallory\n".encode() + b"FAIL\t" + b"9" * 5000 + b"\n"
    server = await FakeAuthServer(socket_dir / "auth", noise=noise).start()
    dovecot = client(server.path)
    try:
        for _ in range(2):
            assert (await dovecot.ask(b"alice@example.test", b"s3cret", secured=True)).login == "alice@example.test"
        assert server.connections == 1
    finally:
        await dovecot.close()
        await server.stop()
    assert parse_line("OK\t\u00b2\tuser=x\n".encode()).id is None


def test_the_protocol_lines():
    assert parse_line(b"OK\t7\tuser=alice@example.test\t\n").args["user"] == "alice@example.test"
    fail = parse_line(b"FAIL\t8\tuser=x\ttemp\treason=it broke\n")
    assert (fail.command, fail.id, "temp" in fail.args, fail.args["reason"]) == ("FAIL", 8, True, "it broke")
    handshake = Handshake()
    assert not any(handshake.feed(line + b"\n") for line in HANDSHAKE.split(b"\n")[:-2])
    assert handshake.feed(b"DONE\n") and handshake.mechanisms == ["PLAIN", "LOGIN"]
    with pytest.raises(HandshakeError, match="no VERSION"):
        Handshake().feed(b"DONE\n")


async def test_reloads_share_the_connection_to_the_auth_server_and_the_stop_closes_it(mailflow_server, socket_dir):
    """Each reload built its listeners a DovecotAuth of their own, never closed (not even at the stop): a server
    reloaded often kept one more connection to Dovecot's auth server per reload. One connection per auth socket
    serves every reload, as it serves every listener, and the stop closes it."""
    server = await FakeAuthServer(socket_dir / "auth").start()
    try:
        mf = await mailflow_server(smtpd={"sasl_auth_enable": True, "sasl_type": "dovecot",
                                          "sasl_path": str(server.path), "allow_plaintext_auth_on_loopback": True})
        port = mf.smtp_addresses[0][1]
        for _ in range(5):
            await mf.reload(mf.config)
            c = await SmtpClient.connect(port)
            assert (await c.cmd("EHLO client.test")).code == 250
            login = base64.b64encode(b"\0alice@example.test\0s3cret").decode()
            assert (await c.cmd(f"AUTH PLAIN {login}")).code == 235
            await c.close()
        assert server.connections == 1
        await mf.stop()
        await eventually(lambda: server.ended == 1, what="the connection to the auth server closed at the stop")
    finally:
        await server.stop()
