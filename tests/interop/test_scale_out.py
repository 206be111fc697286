"""Scale-out, shown (docs/scaling.md): two mailflow nodes (real `mailflow serve` processes, each with its own
queue) behind HAProxy (round robin, send-proxy-v2), delivering by LMTP to one Dovecot. Mail flows through the
balancer while one node is SIGKILLed with acknowledged mail in its queue and started again: every message that
got its 250 ends up in the Dovecot mailbox, and each node's queue drains.

To be sure the killed node holds acknowledged, undelivered mail, the mailbox store stalls (Dovecot SIGSTOPped)
before the kill and comes back after the restart: what is queued then waits in the queues, as it would behind a
slow or restarting store."""
from __future__ import annotations

import asyncio
import email
import email.policy
import itertools
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from tests.support import (ServerProcess, base_settings, eventually, free_port, lmtp_route, merged, queue_counts,
                           send, to_toml)
from tests.support.haproxy import haproxy_instance

pytestmark = pytest.mark.interop

MAILBOX = "alice@example.test"
ATTEMPTS = 20  # a client retries a message this often (a real sending MTA retries for days)
PACE = 0.02  # seconds each client waits between two messages
MESSAGES_LIMIT = 1000  # the senders stop by themselves after this many messages (a bound, never reached)


@dataclass
class Node:
    server: ServerProcess
    queue: Path

    def queued(self) -> int:
        return sum(queue_counts(self.queue / "queue.db").values())


def node(tmp_path: Path, name: str, dovecot) -> Node:
    port, folder = free_port(), tmp_path / name
    folder.mkdir()
    settings = merged(base_settings(folder), {
        "myhostname": f"{name}.mailflow.test", "relay_domains": ["example.test"], "transport_maps": lmtp_route(dovecot),
        "smtpd": {"listen": [f"127.0.0.1:{port}"], "upstream_proxy_protocol": "haproxy"},
    })
    config = folder / "mailflow.toml"
    config.write_text(to_toml(settings))
    return Node(ServerProcess(config, folder / "server.log", port), folder / "queue")


class Senders:
    """Clients sending numbered messages through the balancer, each retried until acknowledged (250)."""

    def __init__(self, port: int, workers: int = 2):
        self.port = port
        self.acknowledged: list[str] = []
        self.retries = 0
        self._numbers = itertools.count(1)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def _work(self) -> None:
        while not self._stop.is_set():
            number = next(self._numbers)
            if number > MESSAGES_LIMIT:
                return
            token = f"scale-{number}"
            content = f"Subject: {token}\r\nMessage-ID: <{token}@remote.test>\r\n\r\nbody {token}\r\n".encode()
            for _ in range(ATTEMPTS):
                try:
                    await send(self.port, "sender@remote.test", [MAILBOX], content)
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    self.retries += 1  # no 250: the message was not acknowledged; send it again
                    await asyncio.sleep(0.05)
                    continue
                self.acknowledged.append(token)
                await asyncio.sleep(PACE)
                break
            else:
                raise AssertionError(f"{token}: not acknowledged after {ATTEMPTS} attempts")

    async def more(self, count: int) -> None:
        """Wait until `count` more messages have been acknowledged."""
        target = len(self.acknowledged) + count
        await eventually(lambda: len(self.acknowledged) >= target, timeout=15, what=f"{count} more acknowledged")

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


def subjects(messages: list[bytes]) -> list[str]:
    return [email.message_from_bytes(m, policy=email.policy.default)["Subject"] for m in messages]


async def test_no_acknowledged_mail_is_lost_when_a_node_behind_the_balancer_is_killed(tmp_path, dovecot):
    nodes = [node(tmp_path, "node1", dovecot), node(tmp_path, "node2", dovecot)]
    await asyncio.gather(*(n.server.start() for n in nodes))  # the back ends first, then the balancer
    victim = nodes[0]
    try:
        with haproxy_instance([n.server.port for n in nodes]) as balancer:
            await eventually(lambda: balancer.states() == {"n1": "UP", "n2": "UP"})
            senders = Senders(balancer.port)
            await senders.more(6)  # mail flows to the mailbox through both nodes

            dovecot.pause()  # the store stalls: acknowledged mail stays in the queues
            await senders.more(6)
            await eventually(lambda: victim.queued() >= 2, timeout=10, what="acknowledged mail queued on node1")
            victim.server.kill()  # SIGKILL, with mail on its disk and clients mid-session
            held = victim.queued()
            await eventually(lambda: balancer.states()["n1"] == "DOWN")
            await senders.more(6)  # node2 takes every client meanwhile

            await victim.server.start()  # same queue: what it had acknowledged is there
            await eventually(lambda: balancer.states()["n1"] == "UP")
            dovecot.resume()
            await senders.more(6)
            await senders.stop()

            for n in nodes:
                await eventually(lambda: n.queued() == 0, timeout=20, what=f"{n.queue} drained")
            stored = await eventually(lambda: _all_stored(dovecot, senders.acknowledged), timeout=10,
                                      what="every acknowledged message in the mailbox")
    finally:
        for n in nodes:
            n.server.kill()

    assert held >= 2 and len(senders.acknowledged) >= 24
    assert set(senders.acknowledged) <= set(stored)  # nothing acknowledged is lost (a copy may come twice:
    # a delivery cut by the kill after Dovecot had the whole message is repeated, as Postfix would)
    for n in nodes:
        assert n.server.log_lines("status=sent"), f"{n.queue}: delivered nothing"


async def _all_stored(dovecot, acknowledged: list[str]) -> list[str] | None:
    stored = subjects(await asyncio.to_thread(dovecot.fetch_all, MAILBOX))
    return stored if set(acknowledged) <= set(stored) else None
