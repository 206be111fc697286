"""The pytest plugin (entry point `pytest11`: mailflow): a Sink per test, or one for the whole session.

    mailflow_sink            function scope. In an async test (pytest-asyncio, strict or auto mode) a Sink on
                             the test's own loop, whatever its loop scope (`loop_scope=` of its asyncio marker,
                             else asyncio_default_test_loop_scope): `await mailflow_sink.wait_for(...)`. In a sync
                             test the threaded Sink: `mailflow_sink.wait_for(...)` blocks.
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
from typing import Literal, get_args

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


def _test_loop_scope(request) -> str:
    """The scope of the loop pytest-asyncio runs this test on: its closest `asyncio` marker's `loop_scope`, else
    the `asyncio_default_test_loop_scope` setting (pytest-asyncio's documented rule)."""
    marker = request.node.get_closest_marker("asyncio")
    scope = marker and (marker.kwargs.get("loop_scope") or marker.kwargs.get("scope"))
    if not scope:
        try:
            scope = request.config.getini("asyncio_default_test_loop_scope")
        except ValueError:  # a pytest-asyncio without the setting: the test's own loop
            scope = None
    return scope or "function"


@pytest.fixture
def mailflow_sink(request):
    """See the module docstring."""
    if inspect.iscoroutinefunction(getattr(request, "function", None)):
        if not HAVE_PYTEST_ASYNCIO:
            pytest.fail("mailflow_sink in an async test needs pytest-asyncio")
        scope = _test_loop_scope(request)
        if scope not in LOOP_SCOPES:
            pytest.fail(f"mailflow_sink: unknown asyncio loop scope {scope!r}")
        yield request.getfixturevalue(f"_mailflow_sink_on_{scope}_loop")
        return
    from mailflow.testing.sink import Sink

    with Sink.threaded(**_arguments(request)) as sink:
        yield sink


LoopScope = Literal["function", "class", "module", "package", "session"]
LOOP_SCOPES: tuple[LoopScope, ...] = get_args(LoopScope)


def _sink_on_a_loop(scope: LoopScope):
    """A function-scoped async fixture run on the loop of `scope` (a function object of its own: pytest-asyncio
    marks the function itself with its loop scope)."""
    async def sink_on_the_running_loop(request):
        from mailflow.testing.sink import Sink

        async with Sink(**_arguments(request)) as sink:
            yield sink

    return pytest_asyncio.fixture(sink_on_the_running_loop, loop_scope=scope, name=f"_mailflow_sink_on_{scope}_loop")


if HAVE_PYTEST_ASYNCIO:  # one per loop scope: the Sink must run on the test's loop, whatever the fixtures' default
    for _scope in LOOP_SCOPES:
        globals()[f"_mailflow_sink_on_{_scope}_loop"] = _sink_on_a_loop(_scope)


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
