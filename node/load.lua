-- load.lua: put a red packet into Redis, at create or when rebuilding it from MySQL.
--
-- KEYS[1]  rp:{id}:info     (see open.lua)
-- KEYS[2]  rp:{id}:claims
-- KEYS[3]  rp:{id}:pending
-- ARGV[1]  mode: "create" loads only if the packet is absent (a second create is a no-op);
--          "replace" drops whatever Redis holds, pending claims included, and loads afresh
--          (the caller has frozen the packet and drained its commits first)
-- ARGV[2]  total_amount   ARGV[3] total_packet   ARGV[4] remaining_amount
-- ARGV[5]  remaining_packet   ARGV[6] expire_at_ms
-- ARGV[7]  epoch ms at which all three keys are dropped from Redis (MySQL keeps the packet)
-- ARGV[8]  kind: "lucky" | "equal" | "exclusive"   ARGV[9] amount_each ("" unless equal)
-- ARGV[10] receiver uid ("" unless exclusive)
-- ARGV[11..] committed claims as uid, amount, uid, amount, ...
--
-- Returns 1 when it loaded the packet, 0 when "create" found it already there.

if ARGV[1] == 'create' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1],
  'total_amount', ARGV[2], 'total_packet', ARGV[3],
  'remaining_amount', ARGV[4], 'remaining_packet', ARGV[5],
  'expire_at_ms', ARGV[6], 'state', '',
  'kind', ARGV[8], 'each', ARGV[9], 'receiver', ARGV[10])
redis.call('PEXPIREAT', KEYS[1], ARGV[7])
if #ARGV >= 12 then
  -- in slices: Lua's unpack has a stack limit of a few thousand values
  for first = 11, #ARGV, 1000 do
    redis.call('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
  redis.call('PEXPIREAT', KEYS[2], ARGV[7])
end
return 1
