--[[
  clear_unpersisted: take a session off the unpersisted set, unless it was
  written again after the sweep read it.

  KEYS[1]  sessions:unpersisted:{<n>}  sorted set  sid -> ms it became dirty

  ARGV[1]  session id
  ARGV[2]  the score the sweep read

  Returns:  1 cleared | 0 marked again meanwhile (left for the next sweep)
]]
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
