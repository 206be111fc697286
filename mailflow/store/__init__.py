"""The durable queue: SQLite in WAL mode, one writer, group commit. The only package that speaks SQL.

What it owns: the `message`, `recipient`, `content`, `destination` and `control` rows (mailflow/schema.sql, the
one schema) and the queue state of every message; the content files of big messages in `content/` beside the
database. Everything else reaches the queue through `Store`.

Modules
- `engine.py`   the commit engine: the writer connection on a thread of its own (a whole transaction per call),
                the group committer (N concurrent writers, one fsync), the coalescing batch loader, schema
                version and migrations, maintenance (incremental vacuum, WAL truncation); `store_fault()`.
- `contents.py` content rows and content files: storing a message's content durably (hard links, fsyncs),
                reading it back as a `Content`, sweeping files left by a crash.
- `daemon.py`   `Store` as the server uses it: open/close, insert, claim, record_results, finish, due, content,
                recover, sweep, maintain, and qmgr's view of the operator tools.
- `operator.py` the operator API behind `mailflow queue …` (pages, detail, hold/release/requeue/flush/delete,
                shape, destinations), a part of `Store`.

Import from here: `from mailflow.store import Store, NewMessage, store_fault, SCHEMA_VERSION`, and the operator
API's rows (MessageRow, MessageDetail, RecipientRow, ShapeCount, DestinationRow).
"""
from mailflow.model import NewMessage
from mailflow.store.daemon import Store
from mailflow.store.engine import SCHEMA_VERSION, store_fault
from mailflow.store.operator import DestinationRow, MessageDetail, MessageRow, RecipientRow, ShapeCount

__all__ = ["DestinationRow", "MessageDetail", "MessageRow", "NewMessage", "RecipientRow", "SCHEMA_VERSION",
           "ShapeCount", "Store", "store_fault"]
