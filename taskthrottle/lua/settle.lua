--[[ settle.lua: adjust a lease's charges and free its slots, once per op id.
Keys and entries as in prelude.lua; the op is this settle.

ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      lease id
ARGV[3]      D, the number of deltas
ARGV[4..]    the entries, as in prelude.lua: first D deltas on buckets and quotas
             (amount_mt > 0 charges, possibly into debt; < 0 refunds, never past full),
             then the concurrency slots to free

Returns 1 when applied, 0 when the op was done before.
]]

local now = clock()
local lease, deltas = ARGV[2], num(ARGV[3])
local entries, hashes = read_entries(4)
if op_claim(now, now) then return 0 end

for i = 1, deltas do look(entries[i], now) end
for i = deltas + 1, #entries do
  local e = entries[i]
  -- A lease pruned on expiry is no longer counted: only a member removed here is.
  if redis.call('ZREM', e[KEY], slot_member(e, lease)) == 1 then
    slots_count(e[KEY], e[NAME], -e[AMOUNT])
  end
end
charge(hashes, now)
return 1
