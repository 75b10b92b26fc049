--[[
  tag_session: give a memory's recall copy written before the `session` TAG existed the
  session its PostgreSQL row names, so a search filtered by session finds it.

  KEYS[1]  memory:<uid>:<id>  hash  a memory's recall copy

  ARGV[1]  session id (from the row's session_id)

  Returns:  1 tagged | 0 already tagged, or gone (a memory forgotten after the row was
            read is not re-created as a stray hash)
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('HSETNX', KEYS[1], 'session', ARGV[1])
