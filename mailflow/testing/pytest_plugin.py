"""The pytest plugin (entry point `pytest11`: mailflow): a Sink per test, or one for the whole session.

    mailflow_sink            function scope. In an async test (pytest-asyncio, strict or auto mode) a Sink on
                             the test's own loop: `await mailflow_sink.wait_for(...)`. In a sync test the threaded
                             Sink: `mailflow_sink.wait_for(...)` blocks.
    mailflow_sink_session    one threaded Sink for the session, its messages and faults cleared before each test
                             (blocking API; `await sink.wait_for_async(...)` from an async test)
    @pytest.mark.mailflow(**settings)    the Sink's arguments for `mailflow_sink` in that test (or class/module):
                             options (virtual_time=True, tls="encrypt", users={...}, http_api=True, ...) and
                             settings (relay_domains=[...], queue={...}); a `config` too

Loading the plugin costs pytest's start-up nothing noticeable: mailflow itself is imported when a fixture is
first used. It defines nothing else (no hooks beyond registering its marker), so a suite that does not ask for
its fixtures runs as before.
"""
from __future__ import annotations

import inspect

import pytest

try:
    import pytest_asyncio
    HAVE_PYTEST_ASYNCIO = True
except ImportError:  # no async tests without it: the sync fixtures still work
    HAVE_PYTEST_ASYNCIO = False


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "mailflow(**settings): arguments of the mailflow_sink fixture's Sink "
                                       "(options such as virtual_time=True, and config.toml settings)")


def _arguments(request) -> dict:
    marker = request.node.get_closest_marker("mailflow")
    if marker is None:
        return {}
    if marker.args:
        return {"config": marker.args[0], **marker.kwargs}
    return dict(marker.kwargs)


@pytest.fixture
def mailflow_sink(request):
    """See the module docstring."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        if not HAVE_PYTEST_ASYNCIO:
            pytest.fail("mailflow_sink in an async test needs pytest-asyncio")
        yield request.getfixturevalue("_mailflow_sink_on_test_loop")
        return
    from mailflow.testing.sink import Sink

    with Sink.threaded(**_arguments(request)) as sink:
        yield sink


if HAVE_PYTEST_ASYNCIO:
    @pytest_asyncio.fixture
    async def _mailflow_sink_on_test_loop(request):
        from mailflow.testing.sink import Sink

        async with Sink(**_arguments(request)) as sink:
            yield sink


@pytest.fixture(scope="session")
def _mailflow_sink_for_session():
    from mailflow.testing.sink import Sink

    with Sink.threaded() as sink:
        yield sink


@pytest.fixture
def mailflow_sink_session(_mailflow_sink_for_session):
    """See the module docstring."""
    _mailflow_sink_for_session.reset()
    yield _mailflow_sink_for_session
