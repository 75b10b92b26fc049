-- 0001: sessions, their messages, long-term memories, cache audit records.
-- Applied once by app.migrations, inside one transaction.

CREATE TABLE sessions (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    title       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    -- memory extraction state, mirrored from Redis when a job completes
    cursor_hash text,
    summary     text
);
CREATE INDEX sessions_by_user ON sessions (user_id, updated_at DESC);

CREATE TABLE messages (
    session_id  text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq         integer NOT NULL CHECK (seq >= 0),
    role        text NOT NULL,
    content     text NOT NULL,
    hash        text NOT NULL,
    created_at  timestamptz NOT NULL,
    -- the message's canonical JSON text exactly as appended (json, not jsonb,
    -- keeps the text), so a restore rebuilds the identical history
    body        json NOT NULL,
    PRIMARY KEY (session_id, seq)
);

CREATE TABLE memories (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    session_id  text,
    kind        text NOT NULL,
    content     text NOT NULL,
    source_hash text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX memories_by_user ON memories (user_id, updated_at DESC);

CREATE TABLE cache_audits (
    id          bigserial PRIMARY KEY,
    entry_key   text NOT NULL,
    tool        text NOT NULL,
    distance    double precision,
    overlap     double precision NOT NULL,
    invalidated boolean NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cache_audits_by_tool ON cache_audits (tool, created_at DESC);
