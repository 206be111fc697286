-- The queue. The only module that speaks SQL is mailflow/store.py.
-- A message row exists only once its content and recipients are committed with it (one transaction).
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);

CREATE TABLE IF NOT EXISTS message (
    id           TEXT PRIMARY KEY,                 -- the queue id, as logged
    queue        TEXT NOT NULL DEFAULT 'incoming'
                 CHECK (queue IN ('incoming', 'active', 'deferred', 'hold', 'corrupt')),
    sender       TEXT NOT NULL,                    -- '' is the null sender
    arrival      REAL NOT NULL,                    -- unix time the message was committed
    next_attempt REAL NOT NULL,                    -- unix time it is due (incoming: = arrival)
    attempts     INTEGER NOT NULL DEFAULT 0,
    size         INTEGER NOT NULL,                 -- bytes of content
    smtputf8     INTEGER NOT NULL DEFAULT 0,
    body_type    TEXT NOT NULL DEFAULT '7BIT',     -- 7BIT | 8BITMIME
    client       TEXT NOT NULL DEFAULT ''          -- name[addr] of the submitting client
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS message_due ON message (queue, next_attempt);

CREATE TABLE IF NOT EXISTS recipient (
    message_id TEXT NOT NULL,
    idx        INTEGER NOT NULL,                   -- position in the envelope
    address    TEXT NOT NULL,
    original   TEXT NOT NULL,                      -- as the client gave it (ORCPT)
    status     TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'bounced')),
    dsn        TEXT NOT NULL DEFAULT '',           -- last enhanced status code
    reason     TEXT NOT NULL DEFAULT '',           -- last diagnostic (deferral reason, bounce text)
    PRIMARY KEY (message_id, idx)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS content (
    message_id TEXT PRIMARY KEY,
    data       BLOB NOT NULL                       -- the message as queued: CRLF line endings
);
