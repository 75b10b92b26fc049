-- 0006: users whose data was erased (app/privacy), and the two writes that must
-- refuse them: a turn's persist and a new session's row.
-- `user_digest` names the user (app.identity.user_digest: SHA-256 hex of
-- "backbone-user\n" || id, first 32 digits), so a finished erase leaves no id;
-- `user_id` is kept only while the erase is unfinished (the privacy sweep resumes
-- it), then set to NULL. Rows go ERASED_DAYS after finishing (the sweep).

CREATE TABLE erased_users (
    user_digest  text PRIMARY KEY,
    user_id      text,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX erased_users_unfinished ON erased_users (erased_at) WHERE finished_at IS NULL;
CREATE INDEX deleted_sessions_by_time ON deleted_sessions (deleted_at);
CREATE INDEX sessions_by_update ON sessions (updated_at);

CREATE FUNCTION user_digest(p_user text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT left(encode(sha256(convert_to('backbone-user' || chr(10) || p_user, 'UTF8')), 'hex'), 32)
$$;

-- A new session's row, refused (false) for an erased user. The user's advisory
-- lock is the one MemoryStore.write and the erase's fence take: a create either
-- commits before the fence (and the erase finds it) or sees the fence.
CREATE FUNCTION create_session_row(p_session text, p_user text, p_metadata jsonb DEFAULT '{}')
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('memory:' || p_user));
    IF EXISTS (SELECT 1 FROM erased_users WHERE user_digest = user_digest(p_user)) THEN
        RETURN false;
    END IF;
    INSERT INTO sessions (id, user_id, metadata) VALUES (p_session, p_user, p_metadata)
        ON CONFLICT (id) DO NOTHING;
    RETURN true;
END
$$;

-- persist_turn of 0003, refusing an erased user's turn as a tombstoned session's.
CREATE OR REPLACE FUNCTION persist_turn(
    p_lock_space integer, p_session text, p_user text, p_title text,
    p_seqs integer[], p_roles text[], p_contents text[], p_hashes text[],
    p_created timestamptz[], p_bodies text[]
) RETURNS TABLE (inserted integer, whole boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    n integer;
    last_seq integer := p_seqs[cardinality(p_seqs)];
BEGIN
    PERFORM pg_advisory_xact_lock(p_lock_space, hashtext(p_session));
    IF EXISTS (SELECT 1 FROM deleted_sessions WHERE id = p_session)
       OR EXISTS (SELECT 1 FROM erased_users WHERE user_digest = user_digest(p_user)) THEN
        RETURN QUERY SELECT -1, false;
        RETURN;
    END IF;
    INSERT INTO sessions (id, user_id) VALUES (p_session, p_user) ON CONFLICT (id) DO NOTHING;
    INSERT INTO messages (session_id, seq, role, content, hash, created_at, body)
        SELECT p_session, m.seq, m.role, m.content, m.hash, m.created_at, m.body::json
        FROM unnest(p_seqs, p_roles, p_contents, p_hashes, p_created, p_bodies)
            AS m (seq, role, content, hash, created_at, body)
        ON CONFLICT (session_id, seq) DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE sessions SET updated_at = now(), title = COALESCE(title, p_title)
        WHERE id = p_session;
    RETURN QUERY SELECT n, (SELECT count(*) FROM messages
                            WHERE session_id = p_session AND seq <= last_seq) = last_seq + 1;
END
$$;
