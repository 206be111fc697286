"""The pytest plugin (entry point pytest11 `mailflow`), run by pytest's own plugin tester in a fresh directory:
the fixtures in async tests under pytest-asyncio's strict and auto modes, in sync tests, with the marker, and
the session Sink cleared between tests. The suite that runs these tests loads the same plugin and is not
changed by it (it would not pass otherwise).
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(120)

SEND = '''
import smtplib, aiosmtplib

def send_sync(sink, subject, to="bob@example.com"):
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.sendmail("app@shop.test", [to], f"Subject: {subject}\\r\\n\\r\\nhi\\r\\n")

async def send(sink, subject, to="bob@example.com"):
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port) as client:
        await client.sendmail("app@shop.test", [to], f"Subject: {subject}\\r\\n\\r\\nhi\\r\\n")
'''

ASYNC_TESTS = '''
import asyncio, pytest
from helpers import send

{mark}
async def test_async_on_the_test_loop(mailflow_sink):
    assert mailflow_sink.server.smtpd is not None  # a Sink, not the threaded one
    await send(mailflow_sink, "async")
    [msg] = await mailflow_sink.wait_for(subject="async")
    assert msg.recipients == ("bob@example.com",)

{mark}
@pytest.mark.mailflow(virtual_time=True, relay_domains=["example.com"], relay_transport="smtp")
async def test_marker_settings(mailflow_sink):
    dest = mailflow_sink.destination("example.com")
    dest.answers(451).times(1).then(250)
    await send(mailflow_sink, "relayed")
    await mailflow_sink.advance(minutes=10)
    assert len(dest.messages) == 1
'''

SYNC_TESTS = '''
import pytest
from helpers import send_sync

def test_sync(mailflow_sink):
    send_sync(mailflow_sink, "sync")
    [msg] = mailflow_sink.wait_for(subject="sync")
    assert msg.subject == "sync"

@pytest.mark.mailflow(users={"app": "pw"})
def test_sync_marker(mailflow_sink):
    import smtplib
    with smtplib.SMTP(mailflow_sink.host, mailflow_sink.port) as client:
        with pytest.raises(smtplib.SMTPSenderRefused):
            client.sendmail("a@shop.test", ["b@example.com"], "x")

def test_session_first(mailflow_sink_session):
    mailflow_sink_session.reject(rcpt="nobody@example.com")
    send_sync(mailflow_sink_session, "first")
    assert len(mailflow_sink_session.wait_for(subject="first")) == 1

def test_session_second_starts_clean(mailflow_sink_session):
    assert mailflow_sink_session.messages == []
    send_sync(mailflow_sink_session, "second", to="nobody@example.com")  # the first test's rule is gone
    assert len(mailflow_sink_session.wait_for(subject="second")) == 1
'''


@pytest.fixture
def project(pytester):
    pytester.makepyfile(helpers=SEND)
    pytester.syspathinsert()
    return pytester


def test_auto_mode(project):
    """(--strict-markers: the plugin registers its marker.)"""
    project.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
                    "addopts = --strict-markers\n")
    project.makepyfile(test_async=ASYNC_TESTS.format(mark=""), test_sync=SYNC_TESTS)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


def test_strict_mode(project):
    project.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    project.makepyfile(test_async=ASYNC_TESTS.format(mark="@pytest.mark.asyncio"), test_sync=SYNC_TESTS)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)


def test_without_pytest_asyncio(project):
    project.makepyfile(test_sync=SYNC_TESTS)
    result = project.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(passed=4)


LOOP_SCOPE_TESTS = '''
import asyncio, pytest, aiosmtplib

async def send_and_wait(sink, subject):
    async with aiosmtplib.SMTP(hostname=sink.host, port=sink.port, timeout=3) as client:
        await client.sendmail("app@shop.test", ["bob@example.com"], f"Subject: {subject}\\r\\n\\r\\nhi\\r\\n")
    [msg] = await sink.wait_for(timeout=3)
    assert msg.subject == subject

async def test_function_loop(mailflow_sink):
    await send_and_wait(mailflow_sink, "function")

@pytest.mark.asyncio(loop_scope="module")
async def test_module_loop(mailflow_sink):
    await send_and_wait(mailflow_sink, "module")

class TestOnTheClassLoop:
    pytestmark = pytest.mark.asyncio(loop_scope="class")

    async def test_class_loop(self, mailflow_sink):
        await send_and_wait(mailflow_sink, "class")
'''


def test_the_sink_runs_on_the_tests_loop_whatever_the_loop_scopes(project):
    """The Sink's fixture used to run on the loop of asyncio_default_fixture_loop_scope (here the session's), not
    on the test's: the test's client then waited for a server whose loop was not running, until its timeout."""
    project.makeini("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = session\n")
    project.makepyfile(test_loops=LOOP_SCOPE_TESTS)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
