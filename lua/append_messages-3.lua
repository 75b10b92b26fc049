--[[
  append_messages: optimistic append to a history, only by its owner.

  KEYS[1]  session:{<sid>}       JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user  string  owning user id
  KEYS[3]  session:{<sid>}:deleted  string  delete fence (present: the session was deleted)

  ARGV[1]  user id of the writer
  ARGV[2]  expected next seq: one past the last message's seq the writer saw
           (0 for an empty history). Not the array length: mined messages may
           have been collapsed out of Redis, so the array can start at seq > 0.
  ARGV[3]  TTL in seconds, renewed on both keys
  ARGV[4..] one message JSON each, their seq already set by the writer

  Returns:  {code, next}
            code  1 appended (next = the seq after the last appended message)
                  2 already appended (next = the current next seq): the history
                    ends, from ARGV[2] on, with exactly these messages (their
                    `hash`, which covers sid, seq and content). A call re-sent after
                    its reply was lost (a dropped connection; redis-py's cluster
                    client re-sends by itself) is acknowledged, never stored twice;
                    the TTLs are renewed
                  0 no such session (next 0)
                 -1 the session belongs to another user (next 0)
                 -2 the history moved since the writer read it (next = current next seq)
                 -3 the session was deleted (next 0): a turn still streaming stops here

  JSON.ARRLEN, the $[-1] lookup and JSON.ARRAPPEND are O(1) in the history
  length, so an append costs the same at 10 messages as at 5,000. The
  already-appended check runs only when the history moved on by exactly the
  batch's length, and reads those last messages' hashes (O(batch)).
]]
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {-3, 0}
end
local owner = redis.call('GET', KEYS[2])
if not owner or redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, 0}
end
if owner ~= ARGV[1] then
  return {-1, 0}
end
local next_seq = 0
if redis.call('JSON.ARRLEN', KEYS[1], '.') > 0 then
  -- '[17]' -> 17
  next_seq = tonumber(string.match(redis.call('JSON.GET', KEYS[1], '$[-1].seq'), '%d+')) + 1
end
local batch = #ARGV - 3
if next_seq ~= tonumber(ARGV[2]) then
  if next_seq == tonumber(ARGV[2]) + batch then
    local same = true
    for i = 1, batch do
      -- '["<hex>"]' -> '<hex>' (nil when the message has no hash)
      local stored = string.match(
        redis.call('JSON.GET', KEYS[1], '$[' .. (i - batch - 1) .. '].hash'), '"(%x+)"')
      if stored == nil or stored ~= cjson.decode(ARGV[3 + i]).hash then
        same = false
        break
      end
    end
    if same then
      -- Renewed as the first call did. Also a write of this call's own: a WAIT after
      -- it waits for the replicas to reach past the first call's append too.
      redis.call('EXPIRE', KEYS[1], ARGV[3])
      redis.call('EXPIRE', KEYS[2], ARGV[3])
      return {2, next_seq}
    end
  end
  return {-2, next_seq}
end
for i = 4, #ARGV do
  redis.call('JSON.ARRAPPEND', KEYS[1], '.', ARGV[i])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {1, next_seq + batch}
