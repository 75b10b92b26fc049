--[[
  release_flight: drop a cache single-flight lock, only for the caller that took it.

  KEYS[1]  cache-flight:<tool>:<hash>  string  owner token of the one run of a missed call

  ARGV[1]  owner token

  Returns:  1 released | 0 not held by this token (expired, or taken by another caller since)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
