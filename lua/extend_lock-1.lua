--[[
  extend_lock: renew the extraction lock, only for its owner.

  KEYS[1]  memory-task-lock:{<sid>}  string  owner token

  ARGV[1]  owner token
  ARGV[2]  TTL in milliseconds

  Returns:  1 extended | 0 not held by this token (the caller must stop writing)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
