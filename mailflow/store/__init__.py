"""The durable queue: SQLite in WAL mode, one writer, group commit. The only package that speaks SQL.

What it owns: the `message`, `recipient`, `content`, `destination` and `control` rows (mailflow/schema.sql, the
one schema) and the queue state of every message; the content files of big messages in `content/` beside the
database. Everything else reaches the queue through `Store`.

Modules
- `engine.py`   the commit engine: the writer and reader connections, each on a thread of its own (a whole
                transaction, or a whole read, per call),
                the group committer (N concurrent writers, one fsync), the coalescing batch loader, schema
                version and migrations, maintenance (incremental vacuum, WAL truncation); `store_fault()`.
- `contents.py` content rows and content files: storing a message's content durably (hard links, fsyncs),
                reading it back as a `Content`, sweeping files left by a crash.
- `daemon.py`   `Store` as the server uses it: open/close, insert, take, claim, record_results, finish, due, content,
                recover, sweep, maintain, and qmgr's view of the operator tools.
- `requeue.py`  pickup's side of a requeue (the maildrop queue: read; replaced by a copy in one transaction).
- `operator.py` the operator API behind `mailflow queue …` (pages, detail, hold/release/requeue/flush/delete,
                shape, destinations), a part of `Store`.

Thread hops per relayed message (the event loop hands work to a connection's thread and gets the answer back;
each hop costs about 50 µs of CPU and a few loop turns):
- insert: one write request; concurrent ones share a writer hop (group commit). Every commit is fsynced.
- each scan, shared by the messages it takes: `take` (one write request: read and claimed together), on a timed
  scan `next_due_time` (1 reader hop); once a second the operator poll (`operator_counters`, 1 reader hop).
- content: none for a small message read with its scan; else one reader hop for all asked in one loop turn.
- results: `finish` (a write request; a message with several jobs also one `record_results` per earlier job).
Measured with strace at one session (2 KB, relayed to smtp-sink; docs/performance.md, "Fourth pass"): per
message 2 writer transactions (the insert, the end of the attempt), ~0 reader hops, 2 fdatasync, 21.5 futex calls
(22.7 when the end of the attempt was committed with synchronous=NORMAL and one fdatasync per message).

Import from here: `from mailflow.store import Store, NewMessage, store_fault, SCHEMA_VERSION`, and the operator
API's rows (MessageRow, MessageDetail, RecipientRow, ShapeCount, DestinationRow).
"""
from mailflow.model import NewMessage
from mailflow.store.daemon import SCAN_CONTENT_BUDGET, Store
from mailflow.store.damage import QUEUES
from mailflow.store.engine import store_fault
from mailflow.store.schema import SCHEMA_VERSION
from mailflow.store.operator import DestinationRow, MessageDetail, MessageRow, RecipientRow, ShapeCount
from mailflow.store.requeue import RequeuedMessage, RequeueGone

__all__ = ["DestinationRow", "MessageDetail", "MessageRow", "NewMessage", "QUEUES", "RecipientRow",
           "SCAN_CONTENT_BUDGET", "RequeueGone", "RequeuedMessage", "SCHEMA_VERSION", "ShapeCount", "Store",
           "store_fault"]
