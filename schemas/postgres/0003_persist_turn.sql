-- 0003: persist_turn(), the whole persist of a turn as one statement.
-- One round trip instead of seven (BEGIN, lock, tombstone check, session row,
-- messages, title, COMMIT): the app calls it at the end of every turn.
-- Same order and guarantees as before: the per-session advisory lock shared
-- with delete_session is taken first; the tombstone check is a statement of its
-- own inside this VOLATILE function, so (read committed) it sees a tombstone
-- committed while it waited for the lock, and then nothing is written.
-- Returns (inserted, whole): inserted = -1 for a tombstoned session; whole =
-- every message with seq 0..the last one given is now in the table.

CREATE FUNCTION persist_turn(
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
    IF EXISTS (SELECT 1 FROM deleted_sessions WHERE id = p_session) THEN
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
