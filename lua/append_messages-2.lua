--[[
  append_messages: optimistic append to a history, only by its owner.

  KEYS[1]  session:{<sid>}       JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user  string  owning user id

  ARGV[1]  user id of the writer
  ARGV[2]  expected length: the history length the writer last saw
  ARGV[3]  TTL in seconds, renewed on both keys
  ARGV[4..] one message JSON each, their seq already set by the writer

  Returns:  {code, length}
            code  1 appended (length = new length)
                  0 no such session (length 0)
                 -1 the session belongs to another user (length 0)
                 -2 the history moved since the writer read it (length = current)

  JSON.ARRLEN and JSON.ARRAPPEND are O(1) in the history length, so an append
  costs the same at 10 messages as at 5,000.
]]
local owner = redis.call('GET', KEYS[2])
if not owner or redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
if owner ~= ARGV[1] then
  return {-1, 0}
end
local length = redis.call('JSON.ARRLEN', KEYS[1], '.')
if length ~= tonumber(ARGV[2]) then
  return {-2, length}
end
for i = 4, #ARGV do
  length = redis.call('JSON.ARRAPPEND', KEYS[1], '.', ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {1, length}
