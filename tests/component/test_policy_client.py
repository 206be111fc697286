"""The policy service client's kept connections (mailflow/stages/smtpd/policy.py) against a policy server on
127.0.0.1 that counts its connections and can misbehave: reuse, the bound on concurrent connections, max_idle,
max_ttl, request_limit, a server that closes, the single retry, close()."""
from __future__ import annotations

import asyncio

import pytest

from mailflow.config import config_from_dict
from mailflow.stages.smtpd.policy import PolicyClient, PolicyError, policy_service
from tests.support import SmtpClient, eventually
from tests.support.policy import PolicyServer, read_request

REQUEST = {"request": "smtpd_access_policy", "recipient": "alice@local.test"}


class CountingPolicy(PolicyServer):
    """Answers `action=DUNNO` after `delay`. Misbehaving: `close_after` answers on a connection, it is closed at
    once; `unanswered_after` answers, it is closed when the next request comes, unanswered; `stray`: a line
    after each reply; `only_first_answers`: connections after the first close at their first request."""

    def __init__(self, *, delay: float = 0.0, close_after: int | None = None, unanswered_after: int | None = None,
                 stray: bool = False, only_first_answers: bool = False):
        self.delay, self.close_after, self.unanswered_after = delay, close_after, unanswered_after
        self.stray, self.only_first_answers = stray, only_first_answers
        self.connections = 0  # accepted so far
        self.open = 0  # open now
        self.most_open = 0
        self.requests = 0  # answered

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, self.open = self.connections, self.open + 1
        self.most_open = max(self.most_open, self.open)
        try:
            for answered in range(1, 1000):  # requests on one connection
                if await read_request(reader) is None:
                    break
                if (self.only_first_answers and number > 1) or answered - 1 == self.unanswered_after:
                    break  # closed, unanswered
                await asyncio.sleep(self.delay)
                self.requests += 1
                writer.write(b"action=DUNNO\n\n" + (b"stray=1\n" if self.stray else b""))
                await writer.drain()
                if answered == self.close_after:
                    break
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


async def test_one_connection_serves_query_after_query():
    async with CountingPolicy() as server:
        client = PolicyClient(server.spec, timeout=5)
        for _ in range(20):
            assert await client.query(REQUEST) == "DUNNO"
        assert (server.connections, server.requests) == (1, 20)
        client.close()
        await eventually(lambda: server.open == 0, timeout=5, what="close() closes the kept connection")


async def test_concurrent_queries_share_a_bounded_number_of_connections():
    async with CountingPolicy(delay=0.02) as server:
        client = PolicyClient(server.spec, timeout=5, connection_limit=3)
        answers = await asyncio.gather(*(client.query(REQUEST) for _ in range(30)))
        assert answers == ["DUNNO"] * 30
        assert server.most_open <= 3 and server.connections == 3
        await asyncio.gather(*(client.query(REQUEST) for _ in range(6)))  # the kept ones again
        assert server.connections == 3
        client.close()


async def test_an_idle_connection_is_closed_after_max_idle():
    async with CountingPolicy() as server:
        client = PolicyClient(server.spec, timeout=5, max_idle=0.1)
        await client.query(REQUEST)
        await eventually(lambda: server.open == 0, timeout=5, what="the idle connection is closed")
        await client.query(REQUEST)
        assert server.connections == 2
        client.close()


async def test_a_connection_is_not_reused_after_max_ttl():
    async with CountingPolicy() as server:
        client = PolicyClient(server.spec, timeout=5, max_ttl=0.15)
        await client.query(REQUEST)
        await client.query(REQUEST)
        assert server.connections == 1
        await asyncio.sleep(0.2)
        await client.query(REQUEST)
        assert server.connections == 2
        client.close()


async def test_request_limit_counts_the_queries_of_a_connection():
    async with CountingPolicy() as server:
        client = PolicyClient(server.spec, timeout=5, request_limit=2)
        for _ in range(5):
            await client.query(REQUEST)
        assert server.connections == 3
        client.close()


# smtpd's own settings, far from the service's so that a service using them would be seen
SMTPD_POLICY = {"policy_service_timeout": "100s", "policy_service_max_idle": "100s",
                "policy_service_max_ttl": "1000s", "policy_service_request_limit": 0}


async def test_a_service_in_braces_uses_its_own_timeout_over_smtpds():
    smtpd = config_from_dict({"smtpd": SMTPD_POLICY}).smtpd
    async with CountingPolicy(delay=60) as server:
        service = policy_service(f"{{ {server.spec}, timeout=1s }}", smtpd)
        with pytest.raises(PolicyError, match="timeout after 1s"):
            await asyncio.wait_for(service.client.query(REQUEST), 5)
        service.client.close()


@pytest.mark.parametrize("own", ["max_idle=1s", "max_ttl=1s"])
async def test_a_service_in_braces_closes_its_kept_connection_after_its_own_time(own):
    smtpd = config_from_dict({"smtpd": SMTPD_POLICY}).smtpd
    async with CountingPolicy() as server:
        service = policy_service(f"{{ {server.spec}, {own} }}", smtpd)
        await service.client.query(REQUEST)
        await eventually(lambda: server.open == 0, timeout=4, what=f"the kept connection closed after {own}")
        service.client.close()


async def test_a_service_in_braces_uses_its_own_request_limit_over_smtpds():
    smtpd = config_from_dict({"smtpd": SMTPD_POLICY}).smtpd
    async with CountingPolicy() as server:
        service = policy_service(f"{{ {server.spec}, request_limit=1 }}", smtpd)
        for _ in range(3):
            await service.client.query(REQUEST)
        assert server.connections == 3
        service.client.close()


async def test_a_connection_the_server_closed_is_replaced_before_use():
    async with CountingPolicy(close_after=1) as server:
        client = PolicyClient(server.spec, timeout=5)
        await client.query(REQUEST)
        await asyncio.sleep(0.05)  # the server's close reaches the client while the connection is idle
        for _ in range(3):
            assert await client.query(REQUEST) == "DUNNO"
            await asyncio.sleep(0.05)
        assert server.connections == 4
        client.close()


async def test_a_connection_with_unasked_data_is_not_reused():
    async with CountingPolicy(stray=True) as server:
        client = PolicyClient(server.spec, timeout=5)
        for _ in range(3):
            assert await client.query(REQUEST) == "DUNNO"
        assert server.connections == 3
        client.close()


async def test_a_query_that_fails_on_a_reused_connection_is_retried_once_on_a_new_one():
    async with CountingPolicy(unanswered_after=1) as server:
        client = PolicyClient(server.spec, timeout=5)
        await client.query(REQUEST)
        assert await client.query(REQUEST) == "DUNNO"  # the kept connection closes unanswered: a new one answers
        assert (server.connections, server.requests) == (2, 2)
        client.close()


async def test_the_retry_is_never_repeated():
    async with CountingPolicy(unanswered_after=1, only_first_answers=True) as server:
        client = PolicyClient(server.spec, timeout=5)
        await client.query(REQUEST)
        with pytest.raises(PolicyError, match="closed the connection"):
            await client.query(REQUEST)  # the kept connection, then one new one: both close unanswered
        assert server.connections == 2
        with pytest.raises(PolicyError):
            await client.query(REQUEST)  # a new connection only (none kept), not retried
        assert server.connections == 3
        client.close()


async def rcpt_code(port: int) -> int:
    client = await SmtpClient.connect(port)
    for command in ("EHLO client.test", "MAIL FROM:<s@remote.test>"):
        assert (await client.cmd(command)).code == 250
    code = (await client.cmd("RCPT TO:<alice@local.test>")).code
    await client.close()
    return code


async def test_sessions_share_a_kept_connection_that_a_reload_and_a_stop_close(mailflow_server):
    async with CountingPolicy() as server:
        mf = await mailflow_server(smtpd={"recipient_restrictions": [f"check_policy_service {server.spec}"]})
        port = mf.smtp_addresses[0][1]
        for _ in range(3):
            assert await rcpt_code(port) == 250
        assert (server.connections, server.open, server.requests) == (1, 1, 3)
        await mf.reload(mf.config)
        await eventually(lambda: server.open == 0, timeout=5, what="a reload closes the kept connection")
        assert await rcpt_code(port) == 250
        assert (server.connections, server.open) == (2, 1)
        await mf.stop()
        await eventually(lambda: server.open == 0, timeout=5, what="a stop closes the kept connection")


class DrippingPolicy(PolicyServer):
    """Answers with `lines` junk attributes before its action, each in a write of its own (a hostile server
    dribbling a reply that stays under the size limit)."""

    def __init__(self, lines: int):
        self.lines = lines

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            for _ in range(self.lines):
                writer.write(b"x\n")
                await writer.drain()
                await asyncio.sleep(0)
            writer.write(b"action=DUNNO\n\n")
            await writer.drain()
            await reader.read()
        finally:
            writer.close()


async def test_a_reply_dribbled_line_by_line_is_read_once_not_rescanned_at_each_arrival():
    """Each arrival looks only at what is new: a reply of 15 000 short lines, one per write, is read well within
    the timeout (scanning the whole reply again at each arrival took 15 s of the loop's time)."""
    async with DrippingPolicy(lines=15_000) as server:
        client = PolicyClient(server.spec, timeout=5)
        try:
            assert await client.query(REQUEST) == "DUNNO"
        finally:
            client.close()


class BabblingPolicy(PolicyServer):
    """Answers each request with `answer`, then (`endless`) an attribute line that never ends."""

    def __init__(self, answer: bytes, endless: bool = False):
        self.answer, self.endless = answer, endless

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(self.answer)
            while self.endless:
                writer.write(b"a" * 65536)
                await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(("answer", "endless", "why"), [
    (b"x=", True, "reply longer than 65536 bytes"),  # no line end, no empty line: read up to the limit only
    (b"HTTP/1.1 200 OK\r\n\r\n", False, "reply without an action"),
    (b"\xff\xfe\x00garbage\n\n", False, "reply without an action"),
])
async def test_a_babbling_policy_server_is_a_policy_error_at_once(answer, endless, why):
    async with BabblingPolicy(answer, endless) as server:
        client = PolicyClient(server.spec, timeout=5)
        started = asyncio.get_running_loop().time()
        with pytest.raises(PolicyError, match=why):
            await client.query(REQUEST)
        assert asyncio.get_running_loop().time() - started < 2
        client.close()
