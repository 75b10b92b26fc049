--[[
  release_lock: drop the extraction lock, only for its owner.

  KEYS[1]  memory-task-lock:{<sid>}  string  owner token

  ARGV[1]  owner token

  Returns:  1 released | 0 not held by this token (expired, or another holder)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
