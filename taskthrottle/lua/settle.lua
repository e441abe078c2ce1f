--[[ settle.lua: adjust a lease's charges and free its slots, once per op id.
Keys as in common.lua.

ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      lease id
ARGV[3]      op id: remembered for ARGV[4] ms or more; a repeat does nothing
ARGV[4]      ms to remember the op id
ARGV[5]      D, the number of deltas
ARGV[6..]    one entry each, as in common.lua: first D deltas (amount_mt > 0 charges,
             possibly into debt; < 0 refunds, never past full), then the slots to free

Returns 1 when applied, 0 when the op id was seen before.
]]

local now = clock()
local lease, op, memory, deltas = ARGV[2], ARGV[3], num(ARGV[4]), num(ARGV[5])
local seen, stale = op_recall(op, now, memory)
if seen then return 0 end
local entries = read_entries(6)

local states = {}
for i = 1, deltas do
  local _, state = look(entries[i], now)
  states[i] = state
end
local writes = {}
for i = 1, deltas do
  charge(entries[i], states[i], now, entries[i].amount, writes)
end
for i = deltas + 1, #entries do
  redis.call('ZREM', entries[i].zkey, slot_member(entries[i], lease))
end
flush(writes)
op_remember(op, '1', now, memory, stale)
return 1
