--[[
  tag_model: give an entry written before the `model` TAG existed the model that made it.

  KEYS[1]  cache:* | kb:* | memory:*  hash  an indexed entry

  ARGV[1]  model id (`<name>:<dims>`, Embedder.model_id)

  Returns:  1 tagged | 0 already tagged, or gone (an entry that expired after the
            SCAN that found it is not re-created as a stray hash)
]]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
return redis.call('HSETNX', KEYS[1], 'model', ARGV[1])
