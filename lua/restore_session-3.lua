--[[
  restore_session: put a persisted history back into Redis, once.

  KEYS[1]  session:{<sid>}       JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user  string  owning user id
  KEYS[3]  session:{<sid>}:deleted  string  delete fence (present: the session was deleted)

  ARGV[1]  user id (from PostgreSQL)
  ARGV[2]  history JSON array, exactly as persisted
  ARGV[3]  TTL in seconds

  Returns:  1 restored | 0 already present (another request restored it first,
            or it was never gone): the caller reads what is there
            | -1 the session was deleted: nothing written (a restore that read
            PostgreSQL just before the delete must not bring it back)
]]
if redis.call('EXISTS', KEYS[3]) == 1 then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('JSON.SET', KEYS[1], '$', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
