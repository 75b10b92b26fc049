--[[
  advance_cursor: move the extraction cursor forward and store the new rolling
  summary with it, only for the lock holder, only from the value it read.

  KEYS[1]  memory-last-extracted:{<sid>}  string  cursor (SHA-256 hex of the last mined message)
  KEYS[2]  memory-task-lock:{<sid>}       string  owner token
  KEYS[3]  memory-summary:{<sid>}         string  rolling summary

  ARGV[1]  owner token
  ARGV[2]  expected current cursor ('' for none)
  ARGV[3]  new cursor (must differ from the expected one: the cursor only moves forward)
  ARGV[4]  new rolling summary
  ARGV[5]  TTL in seconds for cursor and summary

  Returns:  1 advanced | 0 lock not held by this token | -1 cursor moved meanwhile
            | -2 new cursor equals the current one (not forward)
]]
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[2] then
  return -1
end
if ARGV[3] == current then
  return -2
end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
return 1
