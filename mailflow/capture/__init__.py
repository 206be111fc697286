"""The capture server: messages delivered by the `capture` transport, kept in memory for tests and for the
HTTP capture API (docs/testing.md).

    mailbox.py     Mailbox (bounded, oldest out first; wait for messages), CapturedMessage (envelope, raw bytes,
                   parsed message, queue id, SMTP transcript, queue history), Criteria, WaitTimeout
    mime.py        what a message holds: text and HTML bodies, attachments (with Mailpit's part ids), links,
                   addresses
    search.py      Mailpit's search syntax (`to:`, `from:`, `subject:`, … words, quotes, negation)
    recorders.py   Capture: the mailbox with its recorders, the SMTP transcripts (an smtpd session observer,
                   keyed by queue id) and the queue histories (a mail-log observer)
    mailpit.py     the HTTP routes: a subset of Mailpit's API v1, plus a long-poll wait and each message's history
    settings.py    the settings that make a server capture everything (`mailflow serve --sink`, the Sink)

This package file imports nothing, so that the `capture` transport (mailflow.transports.capture) loads only the
mailbox, never a stage.
"""
