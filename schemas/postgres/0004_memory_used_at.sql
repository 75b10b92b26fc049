-- 0004: memories.used_at, when a memory was last recalled into a turn or written.
-- MEMORY_MAX_PER_USER evicts a user's least recently used memories first
-- (app.memory.store); recall marks use in batches (app.memory.usage).
-- Existing rows start from their last update.

ALTER TABLE memories ADD COLUMN used_at timestamptz NOT NULL DEFAULT now();
UPDATE memories SET used_at = updated_at;
CREATE INDEX memories_by_use ON memories (user_id, used_at DESC, id DESC);
