"""mailflow in a test suite: the production pipeline as an in-process sink (docs/testing.md).

    Sink                  async, on the caller's loop: `async with Sink() as sink: ...` (sink.py)
    Sink.threaded(...)    the same for synchronous suites (threaded.py)
    FakeDestination       a scripted remote SMTP server behind a fake name service (destinations.py)
    CapturedMessage, Criteria, WaitTimeout    what the capture keeps and how to wait for it (mailflow.capture)
    the pytest plugin     fixtures `mailflow_sink`, `mailflow_sink_session`, marker `mailflow` (pytest_plugin.py,
                          registered through the `pytest11` entry point)

Nothing here changes how the server works: capture is a transport, the faults go through smtpd's policy hook
and its session observer, fake destinations are SMTP peers and a Resolver, the clock is mailflow.clock's.
"""
__all__ = ["CapturedMessage", "Criteria", "FakeDestination", "Sink", "ThreadedSink", "WaitTimeout"]


def __getattr__(name: str):
    """The names load on first use, so that the pytest plugin (a module of this package, loaded by every pytest
    run in the environment) costs nothing until a test asks for a Sink."""
    if name in ("Sink", "ThreadedSink"):
        from mailflow.testing import sink

        return getattr(sink, name)
    if name == "FakeDestination":
        from mailflow.testing.destinations import FakeDestination

        return FakeDestination
    if name in ("CapturedMessage", "Criteria", "WaitTimeout"):
        from mailflow.capture.mailbox import CapturedMessage, Criteria, WaitTimeout

        return {"CapturedMessage": CapturedMessage, "Criteria": Criteria, "WaitTimeout": WaitTimeout}[name]
    raise AttributeError(name)
