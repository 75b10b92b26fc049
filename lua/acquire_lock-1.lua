--[[
  acquire_lock: take the per-session extraction lock.

  KEYS[1]  memory-task-lock:{<sid>}  string  owner token

  ARGV[1]  owner token (random, one per job run)
  ARGV[2]  TTL in milliseconds

  Returns:  1 acquired (or already held by this token, TTL renewed) | 0 held by another
]]
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
