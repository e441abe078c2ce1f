--[[ renew.lua: push back the expiry of the slots that leases hold, many leases a call.
After prelude.lua (for the clock and expiries); members as prelude.lua describes them.

KEYS[1..]    the zsets `{ns}:c:<key>` that hold the slots
ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      ttl ms: each slot still held expires this long from now
ARGV[3..]    per lease: its id, the number n of its slots, then n slots "i:slots_mt:name",
             the member "<name>:<slots_mt>:<lease id>" of KEYS[i]

Returns one integer per lease: 1 when every slot of it was still held (each now expires
at now + ttl), 0 when some was gone (released, or expired). A slot gone is not taken
again: another lease may hold it by now. Every argument is read and checked before the
first write.
]]

local now = clock()
local ttl = num(ARGV[2])
if ttl < 1 then return error('taskthrottle: a renewal needs a ttl of at least 1 ms') end

-- Per lease, its slots: {key, member} each.
local leases, j = {}, 3
while j <= #ARGV do
  local lease, n = ARGV[j], tonumber(ARGV[j + 1])
  if not (n and n >= 0 and n == floor(n) and j + 1 + n <= #ARGV) then
    return malformed(tostring(ARGV[j + 1]))
  end
  local slots = {}
  for s = j + 2, j + 1 + n do
    local i, weight, name = string.match(ARGV[s], '^(%d+):(%d+):(.+)$')
    local key = i and KEYS[tonumber(i)]
    if not key then return malformed(ARGV[s]) end
    slots[#slots + 1] = {key, name .. ':' .. weight .. ':' .. lease}
  end
  leases[#leases + 1] = slots
  j = j + 2 + n
end

-- A slot is held while its member's expiry lies ahead, as `look` counts it (an expired
-- one may linger until a write prunes it). ZADD XX moves an expiry, never adds a member.
local out, extended, touched = {}, {}, {}
for l, slots in ipairs(leases) do
  out[l] = 1
  for _, slot in ipairs(slots) do
    local key, member = slot[1], slot[2]
    local expiry = tonumber(redis.call('ZSCORE', key, member))
    if expiry and expiry > now then
      redis.call('ZADD', key, 'XX', now + ttl, member)
      if not touched[key] then touched[key], extended[#extended + 1] = true, key end
    else
      out[l] = 0
    end
  end
end

-- The zset lives as long as its last slot.
local expire = min(ttl, MAX_EXPIRY)
for _, key in ipairs(extended) do
  if redis.call('PTTL', key) < expire then redis.call('PEXPIRE', key, expiry_arg(expire)) end
end
return out
