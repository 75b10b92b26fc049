--[[
  acquire_stream_slot: admit one more open event stream for a user, up to a limit.

  KEYS[1]  streams:{<uid>}  sorted set  slot id -> ms its holder's lease runs out;
                            a node renews the slots it holds, so a crashed node's
                            slots lapse on their own

  ARGV[1]  now (ms since epoch, passed in so tests are deterministic)
  ARGV[2]  lease (ms): the new slot's score is now + lease, and the key's TTL
  ARGV[3]  limit: streams the user may hold open at once
  ARGV[4]  the new slot's id (unique per stream)

  Returns:  {1, held} admitted (held counts the new slot) | {0, held} refused: the
            user already holds `limit` live slots
]]
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
-- Every lease has the same length, so the newest runs out last: the key lives as
-- long as it does (a renewal pushes both forward).
redis.call('PEXPIRE', KEYS[1], lease)
return {1, held + 1}
