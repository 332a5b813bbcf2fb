-- The naive peer's claim (bench/naive.py): one share of a packet for one user, in Redis.
-- KEYS[1] packet hash {remaining_amount, remaining_count}
-- KEYS[2] claims hash {uid -> amount}
-- ARGV[1] uid
-- ARGV[2] a random integer in [0, 2^31), for the double-average draw
-- returns {1, amount} a new share; {2, amount} this uid's earlier share; {0, 0} sold out
local earlier = redis.call('HGET', KEYS[2], ARGV[1])
if earlier then
  return {2, tonumber(earlier)}
end
local count = tonumber(redis.call('HGET', KEYS[1], 'remaining_count') or '0')
if count <= 0 then
  return {0, 0}
end
local left = tonumber(redis.call('HGET', KEYS[1], 'remaining_amount'))
local amount = left
if count > 1 then
  -- double average: uniform in [1, 2 * left / count - 1], leaving a cent for each other share
  local most = math.max(1, math.floor(2 * left / count) - 1)
  amount = 1 + (tonumber(ARGV[2]) % most)
  amount = math.min(amount, left - (count - 1))
end
redis.call('HSET', KEYS[1], 'remaining_amount', left - amount, 'remaining_count', count - 1)
redis.call('HSET', KEYS[2], ARGV[1], amount)
return {1, amount}
