-- load.lua: put a red packet into Redis, at create or when rebuilding it from MySQL.
--
-- KEYS[1]  rp:{id}:info     (see open.lua)
-- KEYS[2]  rp:{id}:claims
-- KEYS[3]  rp:{id}:pending
-- ARGV[1]  mode: "create" loads only if the packet is absent (a second create is a no-op);
--          "replace" drops whatever Redis holds, pending claims included, and loads afresh
--          (the caller has frozen the packet and drained its commits first)
-- ARGV[2]  epoch ms at which all three keys are dropped from Redis (MySQL keeps the packet)
-- ARGV[3]  n: how many of the next arguments are the packet's hash, as name, value pairs.
--          They come from the packet's one definition (node/packet.py redis_fields):
--          total_amount, total_packet, remaining_amount, remaining_packet, expire_at_ms,
--          kind ("lucky" | "equal" | "exclusive"), each ("" unless equal) and receiver
--          ("" unless exclusive)
-- ARGV[4 .. 3+n]  those pairs
-- ARGV[4+n ..]    committed claims as uid, amount, uid, amount, ...
--
-- Returns 1 when it loaded the packet, 0 when "create" found it already there.

if ARGV[1] == 'create' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local n = tonumber(ARGV[3])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'state', '', unpack(ARGV, 4, 3 + n))
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
local first_claim = 4 + n
if #ARGV > first_claim then
  -- in slices: Lua's unpack has a stack limit of a few thousand values
  for first = first_claim, #ARGV, 1000 do
    redis.call('HSET', KEYS[2], unpack(ARGV, first, math.min(first + 999, #ARGV)))
  end
  redis.call('PEXPIREAT', KEYS[2], ARGV[2])
end
return 1
