--[[
  rate_limit: sliding-window limit on one user's message posts (or session creations).

  KEYS[1]  ratelimit:{<uid>}[:sessions]  sorted set  member per accepted request, scored by its time (ms)

  ARGV[1]  now (ms since epoch, passed in so tests are deterministic)
  ARGV[2]  window (ms)
  ARGV[3]  limit: posts allowed per window
  ARGV[4]  a unique member for this post

  Returns:  {1, remaining} accepted | {0, retry_after_ms} refused: the window is full
]]
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, tonumber(oldest[2]) + window - now)}
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return {1, limit - count - 1}
