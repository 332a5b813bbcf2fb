-- freeze.lua: stop or resume changes to one red packet.
--
-- KEYS[1]  rp:{id}:info     (see open.lua)
-- ARGV[1]  "frozen" to stop opens, "" to resume them
--
-- Returns 1 when the packet is in Redis (and now has that state), 0 when it is not.
-- While frozen, open.lua answers -3 and grab.lua keeps answering from the frozen state.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
