--[[
  read_session: the owner, the whole history and the rolling summary in one round
  trip, renewing the session's TTLs.

  KEYS[1]  session:{<sid>}         JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user    string  owning user id
  KEYS[3]  memory-summary:{<sid>}  string  the rolling summary (a turn's context needs it)

  ARGV[1]  TTL in seconds

  Returns:  {owner, history JSON, summary or false}; owner is false when the session
            is not in Redis (expired, evicted, or never created): the caller then
            restores it from PostgreSQL.
]]
local owner = redis.call('GET', KEYS[2])
if not owner or redis.call('EXISTS', KEYS[1]) == 0 then
  return {false, false, false}
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {owner, redis.call('JSON.GET', KEYS[1], '.'), redis.call('GET', KEYS[3])}
