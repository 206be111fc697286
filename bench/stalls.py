"""The longest event-loop stall each hostile-but-legal input makes (tests/support/stalls.py's LoopWatch).

    PYTHONPATH=. python bench/stalls.py [SCENARIO ...]     (no name: all of them)

Each scenario starts mailflow in this process (ServerThread, loopback only) with the feature it exercises in its
settings, sends its message(s) over SMTP, waits (bounded) for the queue to empty, and prints the longest stall over
50 ms with what the loop was running then.
"""
from __future__ import annotations

import smtplib
import sys
import tempfile
import time
from pathlib import Path

from tests.support.servers import ServerThread, base_settings, merged
from tests.support.stalls import LoopWatch

LIMIT = 10_240_000
TOP = 4  # stalls shown per scenario


def header(fields: str = "") -> str:
    return f"From: a@remote.example\r\nTo: alice@local.test\r\nSubject: t\r\nMessage-ID: <x@remote.example>\r\n{fields}"


def one_long_line() -> str:
    return header() + "\r\n" + "x" * (LIMIT - 2000) + "\r\n"


def short_lines() -> str:
    return header() + "\r\n" + "x\r\n" * ((LIMIT - 2000) // 3)


def many_fields() -> str:
    return header("".join(f"X-F{i}: v\r\n" for i in range(100_000))) + "\r\nbody\r\n"


def folded_field() -> str:
    return header("X-Long: a" + "\r\n b" * 100_000 + "\r\n") + "\r\nbody\r\n"


def nested_mime(depth: int = 10_000) -> str:
    head = "".join(f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n' for i in range(depth))
    tail = "".join(f"\r\n--b{i}--\r\n" for i in reversed(range(depth)))
    return header("MIME-Version: 1.0\r\n") + head + "Content-Type: text/plain\r\n\r\nleaf" + tail


def many_parts(parts: int = 50_000) -> str:
    body = "".join(f"--b\r\nContent-Type: text/plain\r\n\r\np{i}\r\n" for i in range(parts)) + "--b--\r\n"
    return header('MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n') + "\r\n" + body


def junk_base64() -> str:
    line = "QUJD!!!@@@" * 7 + "\r\n"
    return header('MIME-Version: 1.0\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n') + \
        "\r\n" + line * ((LIMIT - 4000) // len(line))


SHAPES = {"long-line": one_long_line, "short-lines": short_lines, "many-fields": many_fields,
          "folded-field": folded_field, "nested-mime": nested_mime, "many-parts": many_parts,
          "junk-base64": junk_base64}

BACKTRACK = "/^(a|aa)+$/ REJECT\n/(x+x+)+y/ REJECT\n/^(.*),(.*),(.*),(.*)z/ REJECT\n/b[0-9]+c/ WARN\n"


def checks(tmp: Path, kind: str) -> dict:
    table = tmp / f"checks.{kind}"
    table.write_text(BACKTRACK + "".join(f"/word{i}[a-z]*end/ WARN w{i}\n" for i in range(500)))
    spec = f"{kind}:{table}"
    return {"checks": {"header_checks": [spec], "mime_header_checks": [spec], "body_checks": [spec]}}


def fanout(tmp: Path, lists: int, members: int = 1000, domain: str = "relay.test") -> dict:
    table = tmp / "virtual"
    table.write_text("".join(f"list{i}@local.test " + ",".join(f"u{i}x{j}@{domain}" for j in range(members)) + "\n"
                             for i in range(lists)))
    return {"virtual_alias_maps": [f"texthash:{table}"]}


BOUNCING = {"virtual_alias_maps": ["inline:{ @relay.test=nosuch@local.test }"]}  # local: unknown user, 5.1.1


def counts(server: ServerThread) -> dict:
    """The queue's counts, or {"?": 0} when the server's loop did not answer within 5 s."""
    try:
        return server.counts()
    except TimeoutError:
        return {"?": 0}


def run(name: str, message: str, overrides: dict, tmp: Path, rcpts: list[str] | None = None,
        settle: float = 120, mail_options: tuple[str, ...] = ()) -> None:
    settings = merged(base_settings(tmp), {"smtpd": {"listen": ["127.0.0.1:0"], "message_size_limit": LIMIT},
                                           "local": {"maildir_base": str(tmp / "mail"),
                                                     "mailbox_size_limit": 0}})
    settings = merged(settings, overrides)
    server = ServerThread(settings)
    watch = LoopWatch(server._loop)
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=120) as client:
            reply = client.sendmail("a@remote.example", rcpts or ["alice@local.test"], message.encode(),
                                    mail_options=list(mail_options))
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and set(counts(server)) - {"deferred"}:
            time.sleep(0.1)
        delivered = sum(1 for f in (tmp / "mail").rglob("*") if f.is_file() and f.parent.name == "new")
        outcome = f"delivered {delivered}, queue {counts(server)}" if not reply else reply
    except smtplib.SMTPException as e:
        outcome = f"{type(e).__name__}: {e}"[:120]
    finally:
        elapsed = time.monotonic() - started
        watch.close()
        server.stop()
    worst = max(watch.stalls, default=(0.0, "-"))
    print(f"{name:34s} {worst[0] * 1000:8.0f} ms  stalls>50ms={len(watch.stalls):3d}  {elapsed:6.1f} s  {outcome}")
    for seconds, where in sorted(watch.stalls, reverse=True)[:TOP]:
        print(f"    {seconds * 1000:6.0f} ms  {where}", flush=True)


def scenarios():
    for shape, make in SHAPES.items():
        yield f"plain/{shape}", make, lambda tmp: {}
    for kind in ("regexp", "pcre"):
        for shape, make in SHAPES.items():
            yield f"{kind}/{shape}", make, lambda tmp, kind=kind: checks(tmp, kind)


def main(names: list[str]) -> None:
    for name, make, overrides in scenarios():
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, make(), overrides(Path(tmp)), Path(tmp))
    bounces = {"bounce/1000-rcpts": (header() + "\r\nbody\r\n", [f"u{i}@relay.test" for i in range(1000)], ()),
               "bounce/ret-full-10MB": (one_long_line(), ["u@relay.test"], ("RET=FULL",)),
               "bounce/ret-full-short-lines": (short_lines(), ["u@relay.test"], ("RET=FULL",))}
    for name, (message, rcpts, options) in bounces.items():
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, message, BOUNCING, Path(tmp), rcpts, settle=30, mail_options=options)
    for lists, domain in ((10, "relay.test"), (100, "relay.test"), (100, "local.test")):
        name = f"virtual/{lists}x1000" + ("-bouncing" if domain == "local.test" else "")
        if names and not any(name.startswith(n) for n in names):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            run(name, header() + "\r\nbody\r\n", fanout(Path(tmp), lists, domain=domain), Path(tmp),
                [f"list{i}@local.test" for i in range(lists)], settle=20)


if __name__ == "__main__":
    main(sys.argv[1:])
