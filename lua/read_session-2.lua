--[[
  read_session: the owner and the whole history in one round trip, renewing both TTLs.

  KEYS[1]  session:{<sid>}       JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user  string  owning user id

  ARGV[1]  TTL in seconds

  Returns:  {owner, history JSON}; owner is false when the session is not in
            Redis (expired, evicted, or never created): the caller then
            restores it from PostgreSQL.
]]
local owner = redis.call('GET', KEYS[2])
if not owner or redis.call('EXISTS', KEYS[1]) == 0 then
  return {false, false}
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {owner, redis.call('JSON.GET', KEYS[1], '.')}
