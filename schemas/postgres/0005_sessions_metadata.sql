-- 0005: a session's metadata, the Conversations API's `metadata` (app.openai):
-- up to 16 string keys with string values, set at creation and replaced by an
-- update. Native sessions have none ('{}').

ALTER TABLE sessions ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}'::jsonb;
