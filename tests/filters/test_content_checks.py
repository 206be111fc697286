"""cleanup's header/body checks (mailflow.filters.content_checks.ContentChecks) on regexp tables, without a server:
the edits a REPLACE or PREPEND makes, BCC, the actions that stop the checks, REJECT's enhanced code. The same
actions are compared with a real Postfix in tests/interop/test_access_vs_postfix.py."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial

import pytest

from mailflow.config.filters import ChecksConfig
from mailflow.content import Content
from mailflow.errors import ContentRejected, LookupRetry, TemporaryError
from mailflow.filters.content_checks import ContentChecks
from mailflow.workers import BoundedWorkers
from tests.support.content import lookups_seen


def checks(tmp_path, header: str = "", body: str = "", workers=None) -> ContentChecks:
    settings = {}
    for name, rules in (("header_checks", header), ("body_checks", body)):
        if rules:
            (tmp_path / name).write_text(rules)
            settings[name] = (f"regexp:{tmp_path / name}",)
    return ContentChecks(ChecksConfig(**settings), workers=workers)


async def inspect(c: ContentChecks, head: bytes, body: bytes = b"\r\nbody\r\n"):
    return await c.inspect("Q1", head, Content.of(body))


async def test_a_replace_of_a_folded_header_keeps_crlf_line_ends_and_the_header_section(tmp_path):
    """$1 of a folded header holds its line break: it goes back as CR LF and a folding blank, and a capture that
    ends with the break does not end the header section with an empty line."""
    c = checks(tmp_path, header="/^Subject: (.*)$/ REPLACE Subject: [ext] $1\n/^X-End: (a.)/ REPLACE X-End: $1\n")
    result = await inspect(c, b"Subject: first\r\n second\r\nX-End: a\r\n b\r\nTo: x@y.test\r\n")
    assert result.head == b"Subject: [ext] first\r\n second\r\nX-End: a\r\nTo: x@y.test\r\n"


async def test_every_bcc_is_kept_and_discard_stops_the_checks(tmp_path):
    c = checks(tmp_path, header="/^X-A:/ BCC a@copy.test\n/^X-B:/ BCC b@copy.test\n/^X-Stop:/ DISCARD\n"
                                "/^X-Late:/ REJECT too late\n", body="/secret/ REJECT body seen\n")
    result = await inspect(c, b"X-A: 1\r\nX-B: 1\r\nX-Stop: 1\r\nX-Late: 1\r\n", b"\r\nsecret\r\n")
    assert result.bcc == ["a@copy.test", "b@copy.test"] and result.discard and result.stopped


@pytest.mark.parametrize("rule, error, dsn, text", [
    ("REJECT", ContentRejected, "5.7.1", "message content rejected"),
    ("REJECT 5.7.9 not here", ContentRejected, "5.7.9", "not here"),
    ("REJECT 4.7.9 come back", TemporaryError, "4.7.9", "come back"),
])
async def test_reject_takes_the_enhanced_code_its_text_starts_with(tmp_path, rule, error, dsn, text):
    c = checks(tmp_path, header=f"/^Subject:/ {rule}\n")
    with pytest.raises(error) as info:
        await inspect(c, b"Subject: x\r\n")
    assert (info.value.dsn, info.value.text) == (dsn, text)


async def test_a_prepend_that_is_no_header_field_is_ignored(tmp_path):
    c = checks(tmp_path, header="/^Subject:/ PREPEND not a header\n")
    head = b"Subject: x\r\n"
    assert (await inspect(c, head)).head == head


MULTIPART = b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n"


async def test_boundaries_are_body_lines_and_a_line_no_header_field_ends_a_part_header(tmp_path):
    """As Postfix's cleanup (mime_state: BODY_OUT on a boundary; the first line of a part's header section that is
    no header field ends it and is a body line): body_checks see `--b1` and the text after a part's last field."""
    c = checks(tmp_path, body="/^--b1$/ REPLACE --b1\n/^--b1--$/ WARN closing\n/^secret/ REPLACE hidden\n")
    result = await inspect(c, MULTIPART, b"\r\n--b1\r\nX-Part: 1\r\nsecret right after\r\n--b1--\r\n")
    assert b"".join(result.body.chunks()) == b"\r\n--b1\r\nX-Part: 1\r\nhidden\r\n--b1--\r\n"
    assert result.warnings == ["body --b1--"]


async def test_the_open_boundaries_are_bounded_as_postfix_bounds_them(tmp_path):
    """mime_nesting_limit (100): a multipart nested deeper opens no boundary, so its delimiter is a body line."""
    c = checks(tmp_path, body="/^--b102$/ REJECT too deep\n")
    parts = b"".join(b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
                     for i in range(1, 102))
    with pytest.raises(ContentRejected):
        await inspect(c, MULTIPART, b"\r\n" + parts + b"--b102\r\nX-A: 1\r\n\r\nx\r\n")


async def test_strip_removes_and_logs_and_a_tab_may_end_the_action_word(tmp_path, caplog):
    """As Postfix 3.7.11's cleanup: `strip: header X-Strip: 1 from ...: stripped` and the header gone; REPLACE<TAB>
    text replaces (the action word ends at strcspn(value, " \\t"))."""
    caplog.set_level(logging.INFO, logger="mailflow.cleanup")
    c = checks(tmp_path, header="/^X-Strip:/ STRIP stripped\n/^X-Tab:/ REPLACE\tX-Tab: replaced\n")
    result = await inspect(c, b"X-Strip: 1\r\nX-Tab: 1\r\nSubject: s\r\n")
    assert result.head == b"X-Tab: replaced\r\nSubject: s\r\n"
    assert [r.getMessage() for r in caplog.records] == ["Q1: strip: header X-Strip: 1: stripped",
                                                        "Q1: replace: header X-Tab: 1: X-Tab: replaced"]


async def test_only_postfixs_mime_headers_go_to_mime_header_checks(tmp_path):
    """Postfix 3.7.11's cleanup: `Content-Language: en` is matched by header_checks, not mime_header_checks."""
    (tmp_path / "header").write_text("/^Content-Language:/ REPLACE X-Was: header_checks\n")
    (tmp_path / "mime").write_text("/^Content-/ REPLACE X-Was: mime\n")
    c = ContentChecks(ChecksConfig(header_checks=(f"regexp:{tmp_path / 'header'}",),
                                   mime_header_checks=(f"regexp:{tmp_path / 'mime'}",)))
    result = await inspect(c, b"Content-Language: en\r\nContent-Type: text/plain\r\n")
    assert result.head == b"X-Was: header_checks\r\nX-Was: mime\r\n"


async def test_a_long_key_is_matched_off_the_event_loop_in_the_message_s_order(tmp_path, monkeypatch):
    """A lookup costs key length x rules once RE2's DFA runs out of memory (seconds for a 100 KB Subject against a
    big table): a header field or a body longer than LONG_KEY is matched in a worker thread, short ones on the loop
    as before; the order of the checks, and their answers, are unchanged."""
    import mailflow.filters.content_checks as module

    seen = lookups_seen(monkeypatch, module)
    c = checks(tmp_path, header="/^X-Long: (y+)$/ WARN long\n/^X-Late:/ REPLACE X-Late: seen\n",
               body="/^z/ WARN z\n")
    long_field = b"X-Long: " + b"y" * module.LONG_KEY
    result = await inspect(c, b"X-A: 1\r\nX-Late: 1\r\n")
    assert (result.head, seen) == (b"X-A: 1\r\nX-Late: seen\r\n", [("X-A: ", True), ("X-Lat", True), ("body", True)])
    seen.clear()
    result = await inspect(c, b"X-A: 1\r\n" + long_field + b"\r\nX-Late: 1\r\n", b"\r\n" + b"z" * module.LONG_KEY)
    assert result.head == b"X-A: 1\r\n" + long_field + b"\r\nX-Late: seen\r\n"
    assert seen == [("X-A: ", False), ("X-Lon", False), ("X-Lat", False), ("zzzzz", False)]
    seen.clear()  # many fields each under LONG_KEY cost as much as one long one: the header section's size decides
    short_fields = b"".join(b"X-Many: " + b"y" * 900 + b"\r\n" for _ in range(4))
    result = await inspect(c, short_fields + b"X-Late: 1\r\n")
    assert result.head == short_fields + b"X-Late: seen\r\n"
    assert seen == [("X-Man", False)] * 4 + [("X-Lat", False), ("body", True)]


async def test_a_long_walk_runs_in_the_checks_own_threads_and_a_cancelled_one_logs_nothing(tmp_path, monkeypatch,
                                                                                           caplog):
    """The body walk ran on asyncio's default pool (shared with the file reads, DNS, deliveries) for nearly every
    message with body checks, and a walk whose session was cancelled went on and logged reject:/warning: lines
    for a message nobody queued: it runs in the checks' own bounded threads, and once cancelled it stops at the
    line under way and logs nothing more."""
    import mailflow.filters.content_checks as module

    threads: list[str] = []
    looking, go_on = threading.Event(), threading.Event()
    lookup = module.lookup_action

    def recorded(tables, key):
        threads.append(threading.current_thread().name)
        if key.startswith("hold"):
            looking.set()
            go_on.wait(10)
        return lookup(tables, key)

    monkeypatch.setattr(module, "lookup_action", recorded)
    pool = BoundedWorkers(module.CHECK_WORKERS, 30, "content checks")
    c = checks(tmp_path, body="/^hold/ WARN held\n/^bad/ REJECT bad\n", workers=pool)
    body = b"\r\nhold\r\n" + b"bad\r\n" + b"z" * module.LONG_KEY + b"\r\n"
    caplog.set_level(logging.INFO, logger="mailflow.cleanup")
    task = asyncio.create_task(inspect(c, b"X-A: 1\r\n", body))
    assert await asyncio.to_thread(looking.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    go_on.set()
    assert await pool.close_within(10)  # (the walk under way ends)
    assert len(threads) == 1 and threads[0].startswith("content-checks"), threads  # (the "bad" line: not looked up)
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.cleanup"] == []


async def test_a_walk_past_its_tables_deadline_logs_nothing_more(tmp_path, monkeypatch, caplog):
    """A walk past a sqlite table's deadline was answered 451 (LookupRetry), but only a cancelled one was marked
    abandoned: this one went on in its thread and logged reject:/warning: lines (which fail2ban reads) for a message
    nobody queued. Any end of the wait marks it abandoned."""
    import sqlite3

    import mailflow.filters.content_checks as module

    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t(k, v)")
    conn.close()
    (tmp_path / "t.cf").write_text(f"dbpath = {db}\nquery = SELECT v FROM t WHERE k='%s'\ntimeout = 0.1\n")
    (tmp_path / "body_checks").write_text("/^hold/ WARN held\n/^bad/ REJECT bad\n")
    looked_up: list[str] = []
    looking, go_on = threading.Event(), threading.Event()
    lookup = module.lookup_action

    def held_back(tables, key):  # (the "hold" line takes longer than the table's deadline, 0.1 + 0.5 s)
        looked_up.append(key)
        if key.startswith("hold"):
            looking.set()
            go_on.wait(10)
        return lookup(tables, key)

    monkeypatch.setattr(module, "lookup_action", held_back)
    pool = BoundedWorkers(module.CHECK_WORKERS, 30, "content checks")
    c = ContentChecks(ChecksConfig(body_checks=(f"regexp:{tmp_path / 'body_checks'}", f"sqlite:{tmp_path / 't.cf'}")),
                      workers=pool)
    caplog.set_level(logging.INFO, logger="mailflow.cleanup")
    try:
        with pytest.raises(LookupRetry):
            await asyncio.wait_for(inspect(c, b"X-A: 1\r\n", b"\r\nhold\r\nbad\r\n" + LONG_BODY), 10)
        assert looking.is_set()
    finally:
        go_on.set()
        assert await pool.close_within(10)  # (the walk under way ends)
    assert looked_up == ["hold"]  # (the "bad" line: not looked up)
    assert [r.getMessage() for r in caplog.records if r.name == "mailflow.cleanup"] == []


async def test_a_regexp_group_over_a_byte_that_is_not_utf8_writes_the_byte_back(tmp_path):
    """regexp: matches such a byte as U+FFFD; its `$1` wrote EF BF BD where Postfix's cleanup writes the byte (a
    header REPLACE and a body PREPEND); any other caller of the table still gets U+FFFD (no reply carries the byte)."""
    c = checks(tmp_path, header="/^X-Latin: (.*)$/ REPLACE X-Latin: [$1]\n", body="/^body (.*)$/ PREPEND was $1\n")
    result = await inspect(c, b"X-Latin: caf\xe9 \xff\r\n", b"\r\nbody caf\xe9\r\n")
    assert result.head == b"X-Latin: [caf\xe9 \xff]\r\n"
    assert result.body.to_bytes() == b"\r\nwas caf\xe9\r\nbody caf\xe9\r\n"
    from mailflow.tables.spec import open_table
    table = open_table(f"regexp:{tmp_path / 'header_checks'}")
    assert table.lookup("X-Latin: caf\udce9") == "REPLACE X-Latin: [caf\ufffd]"


async def test_bytes_that_are_not_utf8_are_matched_and_written_back_as_they_came(tmp_path):
    """Postfix's cleanup hands header_checks and body_checks the line's bytes (a pcre `\\xe9` matches Latin-1 é,
    tests/interop/test_pcre_vs_postfix.py); mailflow matched U+FFFD in their place and a PREPEND wrote the body line
    back with EF BF BD instead of its byte."""
    (tmp_path / "checks").write_text("/^X-Latin: caf\\xe9$/ WARN latin\n/^body caf\\xe9$/ PREPEND before\n")
    c = ContentChecks(ChecksConfig(header_checks=(f"pcre:{tmp_path / 'checks'}",),
                                   body_checks=(f"pcre:{tmp_path / 'checks'}",)))
    result = await inspect(c, b"X-Latin: caf\xe9\r\n", b"\r\nbody caf\xe9\r\n")
    assert result.warnings == ["header X-Latin: caf\udce9"]
    assert result.body.to_bytes() == b"\r\nbefore\r\nbody caf\xe9\r\n"


async def test_a_boundary_that_is_not_utf8_still_opens_its_parts(tmp_path):
    """A MIME boundary with a Latin-1 byte is matched as its bytes: its parts' headers go to mime_header_checks
    (the boundary was kept as `?` or EF BF BD, so the part's header was read as a body line)."""
    c = checks(tmp_path, header="/^Content-Type: text\\/plain/ REJECT part header seen\n")
    head = b'Content-Type: multipart/mixed; boundary="b\xe9"\r\n'
    with pytest.raises(ContentRejected, match="part header seen"):
        await inspect(c, head, b"\r\n--b\xe9\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\xe9--\r\n")


async def test_an_action_s_text_is_taken_as_postfix_s_cleanup_takes_it(tmp_path):
    """A pcre `$1` that is not UTF-8 is no lookup error (it deferred the message, 4.3.0): REPLACE writes its bytes,
    REJECT's text (a reply line) has a space for such a byte and for a control, a folded header's line break
    among them; a REDIRECT to such bytes cannot be queued and stays a lookup error (compared with a private Postfix:
    tests/interop/test_pcre_vs_postfix.py)."""
    from mailflow.errors import LookupRetry

    (tmp_path / "checks").write_text("/^X-Rej: (.*)$/ REJECT rejected [$1]\n/^X-Rep: (.*)$/ REPLACE X-Replaced: $1\n"
                                     "/^X-To: (.*)$/ REDIRECT $1@x.test\n")
    c = ContentChecks(ChecksConfig(header_checks=(f"pcre:{tmp_path / 'checks'}",)))
    result = await inspect(c, b"X-Rep: caf\xe9\r\n")
    assert result.head == b"X-Replaced: caf\xe9\r\n"
    for field, text in ((b"X-Rej: caf\xe9\r\n", "rejected [caf ]"), ("X-Rej: café\r\n".encode(), "rejected [café]"),
                        (b"X-Rej: a\r\n\tb\x7f\r\n", "rejected [a  b ]")):
        with pytest.raises(ContentRejected) as refused:
            await inspect(c, field)
        assert refused.value.text == text
    with pytest.raises(LookupRetry):
        await inspect(c, b"X-To: caf\xe9\r\n")


LONG_BODY = b"\r\n" + b"z" * 3000 + b"\r\n"  # (past LONG_KEY: walked in one of the checks' threads)


async def test_a_walk_gives_up_when_every_check_thread_is_held_by_a_hung_walk(tmp_path):
    """Walks stuck in a hung table (a sqlite read on a hung NFS) held both threads, and the next walk waited for
    one for ever: the SMTP client held at the end of DATA until its own timeout. It gives up as a table that cannot
    answer once no thread finished anything for the pool's wait."""
    pool = BoundedWorkers(1, 0.3, "content checks")
    release = threading.Event()
    hung = asyncio.create_task(pool.run(partial(release.wait, 30)))
    try:
        await asyncio.sleep(0)  # (it takes the one thread)
        started = time.monotonic()
        with pytest.raises(LookupRetry):
            await asyncio.wait_for(inspect(checks(tmp_path, body="/^never/ REJECT no\n", workers=pool),
                                           b"X-A: 1\r\n", LONG_BODY), 5)
        assert time.monotonic() - started < 2
    finally:
        release.set()
        await hung
        assert await pool.close_within(10)


async def test_small_walks_on_the_event_loop_are_no_progress_of_hung_check_threads(tmp_path):
    """Every walk said it moved, the short ones run on the event loop too: with both check threads hung, one small
    message every 0.1 s kept the pool's progress fresh and a long walk waited for a thread for ever (no 451). Only
    the pool's own threads' moves count: it gives up after the pool's wait."""
    pool = BoundedWorkers(2, 0.4, "content checks")
    c = checks(tmp_path, body="/^never/ REJECT no\n", workers=pool)
    release = threading.Event()
    hung = [asyncio.create_task(pool.run(partial(release.wait, 30))) for _ in range(2)]
    stop = asyncio.Event()

    async def small_traffic():
        while not stop.is_set():
            await inspect(c, b"X-A: 1\r\n", b"\r\nsmall\r\n")  # (walked on the loop)
            await asyncio.sleep(0.1)

    traffic = asyncio.create_task(small_traffic())
    try:
        await asyncio.sleep(0)  # (the hung calls take both threads)
        started = time.monotonic()
        with pytest.raises(LookupRetry):
            await asyncio.wait_for(inspect(c, b"X-A: 1\r\n", LONG_BODY), 5)
        assert time.monotonic() - started < 3
    finally:
        stop.set()
        await traffic
        release.set()
        await asyncio.gather(*hung)
        assert await pool.close_within(10)


async def test_a_walk_waits_for_a_thread_while_the_others_make_progress(tmp_path):
    """A queue of slow but working walks (each 0.1 s, 1 s in all, the pool's wait 0.6 s: a margin a loaded machine
    keeps) is waited for, longer than the pool's wait, not deferred."""
    pool = BoundedWorkers(1, 0.6, "content checks")
    queued = [asyncio.create_task(pool.run(partial(time.sleep, 0.1))) for _ in range(10)]
    try:
        await asyncio.sleep(0)  # (they are ahead in the queue)
        started = time.monotonic()
        result = await asyncio.wait_for(inspect(checks(tmp_path, body="/^never/ REJECT no\n", workers=pool),
                                                b"X-A: 1\r\n", LONG_BODY), 30)
        assert not result.stopped and time.monotonic() - started >= 0.59  # (past one wait: not deferred at its end)
    finally:
        await asyncio.gather(*queued)
        assert await pool.close_within(10)


async def test_walks_longer_than_the_wait_that_move_on_do_not_defer_the_others(tmp_path, monkeypatch):
    """Progress was a walk finished: two slow but working walks longer than the pool's wait (a 10 MB message against
    3000 rules is about 100 s, CHECK_WAIT 60 s) made every other walk 451 though both ended soon after. A walk
    moving on a line is progress (here each line 0.05 s, each walk 1.2 s, the wait 0.5 s)."""
    import mailflow.filters.content_checks as module

    lookup = module.lookup_action

    def slow(tables, key):
        if key.startswith("slow"):
            time.sleep(0.05)
        return lookup(tables, key)

    monkeypatch.setattr(module, "lookup_action", slow)
    pool = BoundedWorkers(2, 0.5, "content checks")
    c = checks(tmp_path, body="/^never/ REJECT no\n", workers=pool)
    slow_body = b"\r\n" + b"slow\r\n" * 24 + b"z" * module.LONG_KEY + b"\r\n"
    walks = [asyncio.create_task(inspect(c, b"X-A: 1\r\n", slow_body)) for _ in range(2)]
    try:
        await asyncio.sleep(0)  # (they take both threads)
        started = time.monotonic()
        result = await asyncio.wait_for(inspect(c, b"X-A: 1\r\n", LONG_BODY), 30)
        assert not result.stopped and time.monotonic() - started >= 0.6  # (past the pool's wait: not deferred)
    finally:
        await asyncio.gather(*walks)
        assert await pool.close_within(10)
