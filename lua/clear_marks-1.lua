--[[
  clear_marks: take sessions off a set of marks, each unless it was marked again
  after the reader read it. Serves the unpersisted sets (the sweep and the
  persist after a turn) and `memory-due` (a worker that queued the extractions).

  KEYS[1]  sessions:unpersisted:{<n>} or memory-due  sorted set  sid -> ms of its last mark

  ARGV[1]  session id, ARGV[2] the score the reader read; then more such pairs

  Returns:  how many were cleared (a pair marked again meanwhile is left for the next pass)
]]
local cleared = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    cleared = cleared + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return cleared
