"""The operator tools behind `mailflow queue …`: Postfix's mailq, postsuper, postcat and qshape over the store.

- `selection.py`: which messages (`parse_selection`, `parse_queues`, `Selection`) and the paged walk over them.
- `actions.py`: the changes (`ACTIONS`: hold, release, requeue, delete, flush) and `apply()`, a chunk per
  transaction with progress on stderr.
- `layouts.py`: the reports (mailq, postcat, qshape, destinations), text and JSON.

Nothing here speaks SQL: the store's operator API (mailflow/store/operator.py) reads and changes the queue and
gives typed rows. The CLI (mailflow/cli.py) imports the names below from here.
"""
from mailflow.queue_tools.actions import ACTIONS, PROGRESS_OVER, Action, Progress, apply, either, plural
from mailflow.queue_tools.layouts import (DESTINATION_HEADER, HEADERS_ONLY, MAILQ_HEADER, MAILQ_SHORT_HEADER,
                                          SHAPE_LABELS, SHAPE_MINUTES, SHOW_PARTS, ago, damage_of, destinations_json,
                                          entry_json, entry_postqueue_json, format_destinations, format_shape,
                                          mailq_entry, mailq_footer, mailq_header, mailq_time, message_text, shape_json,
                                          shape_limits, shape_rows, when, write_list_json, write_mailq,
                                          write_postqueue_json, write_show, write_show_json)
from mailflow.queue_tools.selection import (CHUNK, ID_CHUNK, LISTED_QUEUES, NULL_SENDER, QUEUES, Selection,
                                            SelectionError, clean_id, pages, parse_age, parse_domain, parse_queues,
                                            parse_selection, parse_sender)

__all__ = [
    "ACTIONS", "CHUNK", "DESTINATION_HEADER", "HEADERS_ONLY", "ID_CHUNK", "LISTED_QUEUES", "MAILQ_HEADER",
    "MAILQ_SHORT_HEADER", "NULL_SENDER", "PROGRESS_OVER", "QUEUES", "SHAPE_LABELS", "SHAPE_MINUTES", "SHOW_PARTS",
    "Action", "Progress", "Selection", "SelectionError", "ago", "apply", "clean_id", "damage_of", "destinations_json",
    "either", "entry_json", "entry_postqueue_json", "format_destinations", "format_shape", "mailq_entry",
    "mailq_footer", "mailq_header", "mailq_time", "message_text", "pages", "parse_age", "parse_domain", "parse_queues",
    "parse_selection", "parse_sender", "plural", "shape_json", "shape_limits", "shape_rows", "when", "write_list_json",
    "write_mailq", "write_postqueue_json", "write_show", "write_show_json",
]
