"""The inbound filters (docs/filtering.md): what inspects, scores, authenticates or rewrites a message before
it is queued. Each module is a library the stages call; none of them runs on its own, and with a filter off
nothing of it is built (the hot path pays nothing).

    content_checks   header_checks, mime_header_checks, nested_header_checks, body_checks (cleanup's)
    edits            header section edits (insert, change, delete) on a Content, nothing else copied
    milter/          the Milter client: protocol (sans-IO codec), client (asyncio edge, timeouts, default action),
                     session (one per SMTP session, every milter of the listener)
    scanners         spamd (aiospamc) and clamd (INSTREAM): a verdict per message, with timeouts
    greylist         check_greylist's triplet store (SQLite, its own file and thread)
    senderauth       SPF (pyspf), DKIM verification (dkimpy, the body hashed as a stream), DMARC (authheaders),
                     the Authentication-Results header
    pipeline         what smtpd's handler awaits at the end of a message: milters, scanners, sender
                     authentication, in that order, turned into one verdict

Layering: above the configuration and the leaves; below the stages (which import it), never importing them.
"""
