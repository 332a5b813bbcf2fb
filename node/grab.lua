-- grab.lua: "is anything left for me?" (抢). Reads only; never reserves a share.
--
-- KEYS[1]  rp:{id}:info     (see open.lua)
-- KEYS[2]  rp:{id}:claims
-- ARGV[1]  uid (decimal)
-- ARGV[2]  now in epoch milliseconds
--
-- Returns {code, amount}:
--    1  available            2  already opened by this uid (amount)
--    0  not in Redis (caller loads it from MySQL)
--   -1  sold out            -2  expired
--   -4  not for you (an exclusive packet for another uid)
-- A frozen packet answers as usual: freezing stops changes, not reads.

local state = redis.call('HMGET', KEYS[1], 'remaining_packet', 'expire_at_ms', 'receiver')
if not state[1] then
  return {0, 0}
end
if state[3] and state[3] ~= '' and state[3] ~= ARGV[1] then
  return {-4, 0}
end
local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  return {2, tonumber(prior)}
end
if tonumber(ARGV[2]) >= tonumber(state[2]) then
  return {-2, 0}
end
if tonumber(state[1]) <= 0 then
  return {-1, 0}
end
return {1, 0}
