"""Shared test support: the one copy of each thing several tests need. Test-only; an end user's embedded sink
lives in `mailflow.testing`. The fixtures that start things (mailflow_server, smtp_peer, dns_zone, write_config)
are in tests/conftest.py and build on these.

- dialogue: `SmtpClient` (the raw SMTP dialogue client) and its `Reply`; `rcpt_reply`, `rcpt_until`,
  `end_of_data_replies`, `send`, `client_hello`, `half_client_hello`, `implicit_tls_talking_first`.
- waiting: `eventually` (bounded polling that fails with a message), `queue_becomes`, `lines_logged`, `sessions_over`,
  `settled_in` (when a table file's stamp is one a reload trusts),
  `timed` and `as_prompt_as` (a wait for a server timer bounded by Postfix's in the same run), `ScanWatch` (qmgr's
  scans, to say "passed over" without a fixed sleep), `LoopLag` (what work cost the loop).
- transports: `RecordingTransport`, `ScriptedTransport` (with `always`), `BlockingTransport`: fake delivery agents.
- clocks: `RecordingClock` (a VirtualClock that records its sleeps), `qmgr_turn` (qmgr has run a whole turn).
- ports: `free_port`, `accepts`, `LOOPBACK_NAME`, `LOOPBACK_CLIENT` (how smtpd names a client on 127.0.0.1).
- peers: `CapturePeer`, `CaptureHandler`, `Captured`, `stall_mail`, `ZoneAuthority` (in-process SMTP and DNS peers).
- servers: `base_settings`, `merged`, `to_toml`, `ServerProcess`, `ServerThread`, `queue_counts`.
- content: `big_message`, `spooled`, `maildir_messages`.
- browser: `Chromium` (headless: the DOM after the scripts ran, a DevTools session to click and take screenshots),
  `keep_artifact` (a screenshot kept where CI collects it).
- tools: `require_tool`, `run_tool`; scripts: `script_dir` (shell scripts for command deliveries); postfix:
  `postfix_instance` (a private Postfix); milters: `scripted_milter` (the filter side of the Milter protocol,
  told what to answer; import it from tests.support.milters); dovecot: `dovecot_instance` (a private Dovecot, LMTP and
  IMAP), `Dovecot`, `lmtp_route`; policy: `PolicyServer`, `read_request` (the server side of the policy protocol; import
  them from tests.support.policy); sessions: `replay_sessions`, `connected`, `xclient`, `restriction_settings`,
  `disconnects`, `every_session_ended` (scripted sessions for the differential tests of restriction lists; import
  them from tests.support.sessions); client_certs: `ClientPki` (a CA, the server's certificate and client
  certificates with their Postfix fingerprints, for tls_ask_ccert; import it from tests.support.client_certs); raw:
  `converse`, `read_until_closed`, `answers_noop` (SMTP over a blocking socket, for the fuzz and hostile tests),
  `rss_mb`, `peak_rss_mb`, `reset_peak_rss` (a process's memory from /proc; import them from tests.support.raw).
- calls: `times_called`, `callees` (one function's share of a cProfile run, for a test that a change made that
  function cheaper; import them from tests.support.calls).
- seeds: `seed_list` (an exploration's MAILFLOW_*_SEEDS, `1-300` or `1,5,9`; import it from tests.support.seeds).
- dialogues, wide_dialogues: `generated(seed)` (seeded SMTP sessions for the dialogue differentials against
  Postfix; wide_dialogues adds address forms, SMTPUTF8, VRFY, 8-bit, NUL, bare CR and LF, and its `odd_generated`
  8-bit parameters, odd blanks and blank lines) and wide_dialogues' `reply_key` (a reply as code and enhanced code
  class.subject); import them from their modules.

Every name above but those said otherwise is importable from `tests.support` itself.
"""
from tests.support.browser import Chromium, keep_artifact
from tests.support.clocks import RecordingClock, qmgr_turn
from tests.support.content import big_message, maildir_messages, spooled
from tests.support.dialogue import (Reply, SmtpClient, client_hello, end_of_data_replies, half_client_hello,
                                    implicit_tls_talking_first, rcpt_reply, rcpt_until, send, send_probe)
from tests.support.dovecot import Dovecot, dovecot_instance, lmtp_route
from tests.support.peers import CaptureHandler, Captured, CapturePeer, ZoneAuthority, stall_mail
from tests.support.ports import LOOPBACK_CLIENT, LOOPBACK_NAME, accepts, free_port
from tests.support.postfix import postfix_instance
from tests.support.scripts import ScriptDir, script_dir
from tests.support.servers import ServerProcess, ServerThread, base_settings, merged, queue_counts, to_toml
from tests.support.tools import require_tool, run_tool
from tests.support.transports import BlockingTransport, RecordingTransport, ScriptedTransport, always
from tests.support.waiting import (LoopLag, ScanWatch, as_prompt_as, eventually, lines_logged, queue_becomes,
                                  sessions_over, settled_in, timed)

__all__ = [
    "LOOPBACK_CLIENT", "LOOPBACK_NAME", "BlockingTransport", "CaptureHandler", "CapturePeer", "Captured", "Chromium",
    "Dovecot", "as_prompt_as", "timed", "LoopLag", "RecordingClock",
    "RecordingTransport", "Reply", "ScanWatch", "ScriptDir", "ScriptedTransport", "ServerProcess", "ServerThread",
    "SmtpClient",
    "ZoneAuthority", "accepts", "always", "base_settings", "big_message", "dovecot_instance", "eventually", "free_port",
    "client_hello", "end_of_data_replies", "half_client_hello", "implicit_tls_talking_first",
    "keep_artifact", "lines_logged", "lmtp_route", "maildir_messages", "merged",
    "postfix_instance", "qmgr_turn", "queue_becomes", "queue_counts", "rcpt_reply", "rcpt_until", "require_tool",
    "send_probe",
    "run_tool", "script_dir", "send", "sessions_over", "settled_in", "spooled", "stall_mail", "to_toml",
]
