"""`[queue]` (the queue manager and the store) and `[sendmail]` (local submission into the queue).

    QueueConfig, SendmailConfig, queue_floor(queue_minfree, message_size_limit) (the free space both keep),
    free_space(path) (the bytes free there), leaves_too_little(free, floor, taking) (the comparison smtpd and the
    spool of commands' input both make)

Failure behaviour: a bad value raises ValueError (a ConfigError once loaded), e.g. a maximal_backoff_time
below minimal_backoff_time, or a table spec of an unknown type.
"""
from __future__ import annotations

import os
import shutil
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator

from mailflow.config.base import Duration, PostfixInt, Section, TableSpecs, each_one_of
from mailflow.tables import check_spec

# Postfix's error classes (mail_error.c), the words of notify_classes
NOTIFY_CLASSES = ("bounce", "2bounce", "data", "delay", "policy", "protocol", "resource", "software")


def _lowercase_words(value: object) -> object:
    """notify_classes' words in any case (Postfix's name_mask ignores it)."""
    if isinstance(value, (list, tuple)):
        return tuple(w.lower() if isinstance(w, str) else w for w in value)
    return value


LIFETIME_LIMIT = 100 * 86400.0  # Postfix's maximal_queue_lifetime and bounce_queue_lifetime limit (qmgr.c)


def queue_floor(queue_minfree: int, message_size_limit: int) -> int:
    """The bytes the queue's file system keeps free: max(queue_minfree, 1.5 x message_size_limit) (Postfix's
    smtpd_check_queue). smtpd refuses mail below it (452 4.3.1); a command's spooled input may not take the
    file system below it either (pipe.command_spool: that delivery is deferred 4.3.1)."""
    return max(queue_minfree, message_size_limit * 3 // 2)


def free_space(path: str | os.PathLike[str]) -> int:
    """The bytes free for the queue at `path`: statvfs f_bavail x f_frsize, what a user that is not root may use
    (Postfix's fsspace reads f_bavail). Raises OSError."""
    return shutil.disk_usage(path).free


def leaves_too_little(free: int, floor: int, taking: int = 0) -> bool:
    """Whether `free` bytes, less the `taking` bytes about to be written, are no more than `floor`: Postfix's
    smtpd_check_queue refuses mail while free <= floor; smtpd refuses a declared SIZE, and the spool of a
    command's input defers its copy, by the same rule."""
    return free - taking <= floor


class QueueConfig(Section):
    """The queue manager (Postfix qmgr) and the store."""

    queue_run_delay: Duration = Field(300.0, gt=0)
    minimal_backoff_time: Duration = Field(300.0, gt=0)
    maximal_backoff_time: Duration = Field(4000.0, validate_default=True)
    # Deferred mail older than this is returned to the sender; null-sender mail (bounces) gives up sooner.
    maximal_queue_lifetime: Duration = Field(5 * 86400.0, le=LIFETIME_LIMIT)
    bounce_queue_lifetime: Duration = Field(5 * 86400.0, le=LIFETIME_LIMIT)
    # Send the sender one "delayed" notice once a message has waited this long; 0 disables it.
    delay_warning_time: Duration = 0.0
    # Where a bounce that cannot be returned (its own sender is null) goes; "" drops it (logged).
    double_bounce_recipient: str = "postmaster"
    # Postfix's notify_classes: which problems the postmaster hears of (docs/queue.md, "Postmaster notices").
    # bounce: a copy of each failure notice (headers only) to bounce_notice_recipient, and smtpd's transcript of
    # a session refused for a bounce reason (an unknown user, a message too big or looping) to it; 2bounce: a failed
    # notice to double_bounce_recipient; delay: a copy of each delay notice to delay_notice_recipient; data, policy,
    # protocol, resource, software: smtpd's transcript of a session with such an error to error_notice_recipient.
    # Unlike Postfix (whose default is resource, software), 2bounce is on by default: a failed notice is not lost.
    notify_classes: Annotated[tuple[str, ...], BeforeValidator(_lowercase_words),
                              AfterValidator(lambda v: each_one_of(v, NOTIFY_CLASSES))] = (
        "2bounce", "resource", "software")
    bounce_notice_recipient: str = "postmaster"
    delay_notice_recipient: str = "postmaster"
    error_notice_recipient: str = "postmaster"
    # Postfix's bounce_template_file (bounce(5)): the texts of failure, delay and success notices (From, Subject,
    # Postmaster-Subject, Charset, the text with $myhostname, $delay_warning_time_hours...); "": the built-in ones.
    bounce_template_file: str = ""
    # Bounces carry the whole original up to this many bytes, else its headers only.
    bounce_size_limit: PostfixInt = Field(50_000, ge=1)
    active_limit: PostfixInt = Field(10_000, ge=1)
    # Per destination (transport, nexthop): start at the initial concurrency, grow on success up to the
    # limit, shrink on a site failure; after `failed_cohort_limit` failed rounds in a row the destination is
    # dead for `minimal_backoff_time`, and its mail is deferred without a connection attempt.
    initial_destination_concurrency: PostfixInt = Field(5, ge=1)
    default_destination_concurrency_limit: PostfixInt = Field(20, ge=1)
    destination_concurrency_failed_cohort_limit: PostfixInt = Field(1, ge=1)
    # Deliveries at once over all destinations, and per transport where a cap is set ({ smtp = 50 }).
    delivery_concurrency_limit: PostfixInt = Field(100, ge=1)
    transport_concurrency_limit: dict[str, Annotated[PostfixInt, Field(ge=1)]] = {}
    # The pause between two deliveries to the same destination (Postfix default_destination_rate_delay), and per
    # transport where one is set ({ smtp = "10s" }: transport_destination_rate_delay); 0 = none. While it is
    # non-zero the destination's concurrency is 1: at most one delivery per delay.
    destination_rate_delay: Annotated[Duration, Field(ge=0)] = 0.0
    transport_destination_rate_delay: dict[str, Annotated[Duration, Field(ge=0)]] = {}
    # Recipients per delivery to one destination (Postfix default_destination_recipient_limit), per transport where
    # one is set ({ smtp = 20 }: transport_destination_recipient_limit); 0 = no limit. With 1, each recipient is a
    # destination of its own (user@nexthop, without its extension): the concurrency and the rate delay are then
    # per recipient, as Postfix's qmgr makes them. `local` takes any number unless the table sets it: its agent
    # writes one copy per local part per delivery, which a split would break.
    destination_recipient_limit: PostfixInt = Field(50, ge=0)
    transport_destination_recipient_limit: dict[str, Annotated[PostfixInt, Field(ge=0)]] = {}
    commit_batch_limit: int = Field(500, ge=1)
    incoming_backlog_limit: int = Field(5000, ge=1)
    # Bytes of free space the queue's file system must keep (Postfix queue_minfree): smtpd answers MAIL with
    # 452 4.3.1 below max(queue_minfree, 1.5 x smtpd.message_size_limit), or when a SIZE= parameter would not
    # leave that much or is more than half the free space.
    queue_minfree: int = Field(0, ge=0)

    def rate_delay(self, transport: str) -> float:
        """The destination rate delay for mail over `transport`: its own, else destination_rate_delay."""
        return self.transport_destination_rate_delay.get(transport, self.destination_rate_delay)

    def recipient_limit(self, transport: str) -> int:
        """The recipients per delivery for mail over `transport` (0: no limit): its own where the table sets one,
        else none for `local` (its agent's one copy per local part per delivery must see every recipient: see
        transports/local), else destination_recipient_limit."""
        own = self.transport_destination_recipient_limit.get(transport)
        if own is not None:
            return own
        return 0 if transport == "local" else self.destination_recipient_limit

    @field_validator("maximal_backoff_time")
    @classmethod
    def _backoff_order(cls, v: float, info: ValidationInfo) -> float:
        minimal = info.data.get("minimal_backoff_time")
        if minimal is not None and v < minimal:
            raise ValueError(f"is smaller than minimal_backoff_time ({minimal:g}s)")
        return v


class SendmailConfig(Section):
    """Local submission (docs/sendmail.md): `mailflow sendmail` writes to <queue_directory>/maildrop/, the pickup
    stage feeds it to cleanup. authorized_submit_users items are login names or `type:name` tables,
    local_login_sender_maps items are tables; the tables are keyed by login name."""

    # Who may submit with sendmail (Postfix authorized_submit_users): "static:anyone" (any value found
    # means allowed), login names, "!name" to refuse one; the first item that matches decides. Others: exit 77.
    authorized_submit_users: tuple[str, ...] = ("static:anyone",)
    # Which envelope senders (-f/-r, MAIL FROM in -bs) each login may use (Postfix local_login_sender_maps):
    # a table's value lists patterns: "*" any, "<>" the null sender, "@domain", an address, a bare local part
    # (qualified with myorigin). Everyone may use login@myorigin. Unlike Postfix (static:*), only root may
    # name any sender by default.
    local_login_sender_maps: TableSpecs = ("inline:{root=*}",)
    # pickup scans the maildrop at start, when sendmail wakes it (public/pickup), and at least this often.
    pickup_interval: Duration = Field(60.0, gt=0)

    @field_validator("authorized_submit_users")
    @classmethod
    def _submit_users(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if ":" in item:
                check_spec(item)
        return v
