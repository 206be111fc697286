-- The queue. The only code that speaks SQL is the mailflow.store package.
-- A message row exists only once its content and recipients are committed with it (one transaction; a content
-- file is on disk before that transaction commits).
-- A recipient's row is marked as each delivery job ends; the message row changes at the end of an attempt.
-- Queues made by an older mailflow are brought here by MIGRATIONS (mailflow/store/schema.py); schema_version says
-- how far.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);

CREATE TABLE IF NOT EXISTS message (
    id           TEXT PRIMARY KEY,                 -- the queue id, as logged
    queue        TEXT NOT NULL DEFAULT 'incoming'  -- maildrop: requeued by an operator, for pickup to copy
                 CHECK (queue IN ('incoming', 'active', 'deferred', 'hold', 'corrupt', 'maildrop')),
    sender       TEXT NOT NULL,                    -- '' is the null sender
    arrival      REAL NOT NULL,                    -- unix time the message was first committed (delay=, listings)
    created      REAL NOT NULL,                    -- the base of its queue lifetime and backoff: the arrival, or
                                                   -- the time a requeued copy was made (Postfix's create_time)
    next_attempt REAL NOT NULL,                    -- unix time it is due (incoming: = created)
    attempts     INTEGER NOT NULL DEFAULT 0,
    size         INTEGER NOT NULL,                 -- bytes of content
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    body_type    TEXT NOT NULL DEFAULT '',         -- 8BITMIME | 7BIT (BODY=7BIT given) | ''
    client       TEXT NOT NULL DEFAULT '',         -- name[addr] of the submitting client
    envid        TEXT NOT NULL DEFAULT '',         -- DSN ENVID (RFC 3461), '' if none
    ret          TEXT NOT NULL DEFAULT '',         -- DSN RET: FULL | HDRS | '' (not given)
    warned       INTEGER NOT NULL DEFAULT 0,       -- 1 once the "delayed" notice went out
    filter       TEXT NOT NULL DEFAULT '',         -- transport:nexthop of the after-queue content filter, '' none
    -- the client attributes of Postfix's queue file, for the delivery agents ('' unknown: local submission)
    client_name    TEXT NOT NULL DEFAULT '',       -- host name ('unknown' without a verified one)
    client_address TEXT NOT NULL DEFAULT '',       -- IP address (IPv6 ones as 'IPv6:...')
    client_port    TEXT NOT NULL DEFAULT '',
    helo_name      TEXT NOT NULL DEFAULT '',
    protocol_name  TEXT NOT NULL DEFAULT '',       -- SMTP | ESMTP
    sasl_method    TEXT NOT NULL DEFAULT '',
    sasl_username  TEXT NOT NULL DEFAULT '',
    sasl_sender    TEXT NOT NULL DEFAULT '',       -- MAIL FROM's AUTH= value
    -- 0: qmgr's `from=<s>, size=N, nrcpt=N (queue active)` line is owed when the message next enters the active
    -- queue, as Postfix's qmgr writes it each time (held on arrival, deferred, released, recovered)
    from_logged    INTEGER NOT NULL DEFAULT 1,
    -- 1: requeued by an operator while active; the end of its attempt moves it to maildrop, not to deferred
    requeue        INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS message_due ON message (queue, next_attempt);
-- the few messages requeued while active (pickup counts them every second while one waits)
CREATE INDEX IF NOT EXISTS message_requeue ON message (queue) WHERE requeue = 1;

CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL,
    idx        INTEGER NOT NULL,                   -- position in the envelope
    address    TEXT NOT NULL,
    original   TEXT NOT NULL,                      -- as the client gave it (ORCPT)
    notify     TEXT NOT NULL DEFAULT '',           -- DSN NOTIFY: '' (default), NEVER, or SUCCESS,FAILURE,DELAY
    orcpt      TEXT NOT NULL DEFAULT '',           -- DSN ORCPT as given, e.g. 'rfc822;user@example.com'
    status     TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'bounced')),
    dsn        TEXT NOT NULL DEFAULT '',           -- last enhanced status code
    reason     TEXT NOT NULL DEFAULT '',           -- last diagnostic (deferral reason, bounce text)
    relay      TEXT NOT NULL DEFAULT '',           -- where the last attempt went: host[addr]:port, local, none
    notice     INTEGER NOT NULL DEFAULT 0,         -- 1: sent or bounced, its success/failure notice not yet queued
    relayed    INTEGER NOT NULL DEFAULT 0,         -- 1: sent to a gateway (a pipe service without flag X)
    expanded   TEXT NOT NULL DEFAULT '',           -- the alias member the result is about ('' the recipient)
    expansion  TEXT NOT NULL DEFAULT '',           -- 'alias' or 'list' when local delivery expanded it
    owner      TEXT NOT NULL DEFAULT '',           -- a list owner its failure notice goes to ('' the sender)
    diagnostic TEXT NOT NULL DEFAULT '',           -- its notice's Diagnostic-Code when the agent gave one ('x-unix; ...')
    owned      TEXT NOT NULL DEFAULT '',           -- failures told to several lists' owners: JSON ('' none)
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;

-- The message as queued (CRLF line endings) is data, then body, then the file content/<message_id> from
-- file_offset on, each when present. A message up to a few hundred KB is all in the row (data: the header
-- section cleanup wrote, body: the rest); a bigger one keeps its header section here and the rest in the file.
CREATE TABLE IF NOT EXISTS content (
    message_id  TEXT PRIMARY KEY,
    data        BLOB NOT NULL,
    body        BLOB,
    file_offset INTEGER                            -- NULL: no file
);

-- What qmgr knows of each destination (transport, nexthop), written about once a second for the tools.
CREATE TABLE IF NOT EXISTS destination (
    transport  TEXT NOT NULL,
    nexthop    TEXT NOT NULL,
    window     INTEGER NOT NULL,                   -- concurrency allowed now
    in_flight  INTEGER NOT NULL,
    queued     INTEGER NOT NULL,                   -- jobs waiting in memory
    failures   INTEGER NOT NULL,                   -- site failures in a row
    dead_until REAL NOT NULL DEFAULT 0,            -- unix time; 0 = alive
    reason     TEXT NOT NULL DEFAULT '',           -- last site failure
    updated    REAL NOT NULL,
    paused_until REAL NOT NULL DEFAULT 0,          -- unix time a rate delay's pause ends; 0 = not paused
    PRIMARY KEY (transport, nexthop)
) WITHOUT ROWID;

-- Counters shared with the operator tools: 'generation' is bumped by every tool that changes the queue,
-- so a running qmgr (which polls it) rescans within a second.
CREATE TABLE IF NOT EXISTS control (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
