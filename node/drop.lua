-- drop.lua: delete this shard's Redis copy of a red packet it has handed to another shard.
--
-- KEYS[1]  rp:{id}:info     (see open.lua)
-- KEYS[2]  rp:{id}:claims
-- KEYS[3]  rp:{id}:pending
-- (no ARGV)
--
-- Returns  1 when it deleted the packet's keys,
--          0 when Redis does not hold the packet (dropping is idempotent),
--         -1 when the packet is here but not frozen: refused, since only a frozen copy (one
--            that takes no more shares, see freeze.lua) may be dropped.
-- Pending entries left at this point belong to claims already committed to MySQL (the
-- handoff commits every pending claim before it exports the packet), so they go too.

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 0
end
if state ~= 'frozen' then
  return -1
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return 1
