--[[ settle.lua: adjust a lease's charges and free its slots, once per op id.
Keys as in common.lua.

ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      lease id
ARGV[3]      op id: recorded, so that a repeat does nothing
ARGV[4]      D, the number of deltas
ARGV[5..]    one entry each, as in common.lua: first D deltas (amount_mt > 0 charges,
             possibly into debt; < 0 refunds, never past full), then the slots to free

Returns 1 when applied, 0 when the op id was seen before.
]]

local now = clock()
local lease, op, deltas = ARGV[2], ARGV[3], num(ARGV[4])
local entries, hashes = read_entries(5)
local writes = {}
if op_claim(op, now, now, hashes, writes) then return 0 end

for i = 1, deltas do
  look(entries[i], now)
  charge(entries[i], now, writes)
end
for i = deltas + 1, #entries do
  redis.call('ZREM', entries[i].key, slot_member(entries[i], lease))
end
flush(writes, hashes, now)
return 1
