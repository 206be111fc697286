"""`[sink]`: the capture server (`mailflow serve --sink`, and the embedded `mailflow.testing.Sink`).

    SinkConfig

With `enable` the server keeps every message the `capture` transport delivers in memory and serves them over
the HTTP API (`[http]`, docs/testing.md): `mailflow serve --sink` (or `enable = true`) also routes every
recipient to `capture` and accepts any. The limits bound what a capture server holds, whoever sends to it:
the oldest messages go first past `max_messages` or `max_bytes`; SMTP transcripts and queue histories are
kept for at most `history_limit` messages, each transcript at most `transcript_line_limit` lines and
`transcript_byte_limit` bytes.

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded).
"""
from __future__ import annotations

from pydantic import Field

from mailflow.config.base import Duration, Section


class SinkConfig(Section):
    """The capture server (docs/testing.md)."""

    enable: bool = False
    # Messages kept: the oldest go first past either limit (Mailpit's --max).
    max_messages: int = Field(1000, ge=1)
    max_bytes: int = Field(200_000_000, ge=1)
    # SMTP transcripts and queue histories kept (for this many queue ids, the latest), and the size of one
    # transcript.
    history_limit: int = Field(2000, ge=1)
    transcript_line_limit: int = Field(200, ge=10)
    transcript_byte_limit: int = Field(32_768, ge=1024)
    # The HTTP API's long-poll `wait`: the longest a request may wait, and how many may wait at once.
    wait_time_limit: Duration = Field(300.0, gt=0)
    waiters_limit: int = Field(64, ge=1)
