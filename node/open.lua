-- open.lua: take one share of a red packet (拆), atomically.
--
-- KEYS[1]  rp:{id}:info     hash: total_amount total_packet remaining_amount remaining_packet
--                                 expire_at_ms state ("" normally, "frozen" while the node
--                                 rebuilds or hands the packet to another shard),
--                                 kind ("lucky" | "equal" | "exclusive"; absent: lucky),
--                                 each (equal: cents per share), receiver (exclusive: uid)
-- KEYS[2]  rp:{id}:claims   hash: uid -> amount in cents
-- KEYS[3]  rp:{id}:pending  hash: uid -> claim details, until the claim is committed to MySQL
-- ARGV[1]  uid (decimal)
-- ARGV[2]  random integer in [0, 2^31), drawn by the caller from the OS CSPRNG: math.random
--          inside Redis is seeded identically on every start, so it is not used
-- ARGV[3]  now in epoch milliseconds (the node's clock, the same one MySQL rows are stamped with)
-- ARGV[4]  claim details to keep in pending (opaque to this script)
--
-- Returns {code, amount, remaining_packet, pending}:
--    1  a new share: amount, shares left after it, pending = 1
--    2  this uid already opened: its amount, shares left, pending = 1 while not yet committed
--    0  packet not in Redis (never created here, or Redis lost it): caller loads it from MySQL
--   -1  sold out       -2  expired       -3  frozen (retry shortly)
--   -4  not for you: an exclusive packet for another uid (checked first: nothing else is
--       said to someone it was not sent to)
--
-- The amount by kind: equal: `each` (the last share takes what is left, which is the same);
-- exclusive: its one share takes all; lucky: the double-average rule: uniform in [1, m] where m is the largest whole
-- cent below twice the remaining average, capped so that every share still unopened keeps at
-- least 1 cent. The last share takes exactly what is left.

local state = redis.call('HMGET', KEYS[1], 'remaining_amount', 'remaining_packet', 'expire_at_ms',
  'state', 'kind', 'each', 'receiver')
local left = tonumber(state[1])
if not left then
  return {0, 0, 0, 0}
end
if state[7] and state[7] ~= '' and state[7] ~= ARGV[1] then
  return {-4, 0, tonumber(state[2]), 0}
end
local n = tonumber(state[2])
local frozen = state[4] == 'frozen'

local prior = redis.call('HGET', KEYS[2], ARGV[1])
if prior then
  local unsettled = redis.call('HEXISTS', KEYS[3], ARGV[1])
  if frozen and unsettled == 1 then
    return {-3, 0, n, 1}
  end
  return {2, tonumber(prior), n, unsettled}
end

if frozen then
  return {-3, 0, n, 0}
end
if tonumber(ARGV[3]) >= tonumber(state[3]) then
  return {-2, 0, n, 0}
end
if n <= 0 then
  return {-1, 0, 0, 0}
end

local amount
if n == 1 then
  amount = left
elseif state[5] == 'equal' then
  amount = tonumber(state[6])
else
  local m = math.floor((2 * left - 1) / n)
  local cap = left - (n - 1)
  if m > cap then m = cap end
  if m < 1 then m = 1 end
  amount = 1 + (tonumber(ARGV[2]) % m)
end

redis.call('HSET', KEYS[1], 'remaining_amount', left - amount, 'remaining_packet', n - 1)
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return {1, amount, n - 1, 1}
