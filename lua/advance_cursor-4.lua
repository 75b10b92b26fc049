--[[
  advance_cursor: move the extraction cursor forward and store the new rolling
  summary with it, only for the lock holder, only from the value it read, and
  only to a later message (seqs are compared: the cursor never moves backwards).

  KEYS[1]  memory-last-extracted:{<sid>}      string  cursor (SHA-256 hex of the last mined message)
  KEYS[2]  memory-task-lock:{<sid>}           string  owner token
  KEYS[3]  memory-summary:{<sid>}             string  rolling summary
  KEYS[4]  memory-last-extracted:{<sid>}:seq  string  seq of the cursor message

  ARGV[1]  owner token
  ARGV[2]  expected current cursor ('' for none)
  ARGV[3]  new cursor
  ARGV[4]  new rolling summary
  ARGV[5]  TTL in seconds for cursor, its seq and summary
  ARGV[6]  seq of the expected cursor's message, as the caller found it (-1 for none
           or unknown); used when KEYS[4] is absent (a cursor written before seqs
           were stored, or one restored from PostgreSQL's mirror)
  ARGV[7]  seq of the new cursor's message

  Returns:  1 advanced | 0 lock not held by this token | -1 cursor moved meanwhile
            | -2 not forward: the new seq is not after the current one
]]
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[2] then
  return -1
end
local current_seq = tonumber(ARGV[6])
local stored_seq = tonumber(redis.call('GET', KEYS[4]) or '')
if stored_seq and stored_seq > current_seq then
  current_seq = stored_seq
end
if tonumber(ARGV[7]) <= current_seq then
  return -2
end
redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[5])
redis.call('SET', KEYS[4], ARGV[7], 'EX', ARGV[5])
redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
return 1
