--[[
  create_session: start an empty history owned by one user.

  KEYS[1]  session:{<sid>}       JSON    the history (array of messages)
  KEYS[2]  session:{<sid>}:user  string  owning user id

  ARGV[1]  user id
  ARGV[2]  TTL in seconds

  Returns:  1 created | 0 a session with this id already exists
]]
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('JSON.SET', KEYS[1], '$', '[]')
redis.call('SET', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
