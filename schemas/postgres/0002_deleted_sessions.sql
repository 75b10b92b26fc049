-- 0002: tombstones of deleted sessions, so nothing re-creates them.
-- A turn still streaming when its session is deleted, the sweep, a restore and
-- memory extraction all check this table (history_db.persist in the same
-- transaction, under a per-session advisory lock shared with the delete).
-- Kept forever: one short row per deleted session, no content.

CREATE TABLE deleted_sessions (
    id          text PRIMARY KEY,
    user_id     text NOT NULL,
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
