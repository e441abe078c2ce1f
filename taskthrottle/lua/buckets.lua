--[[ buckets.lua: acquire.lua for the common request, token buckets of one key, with the
bucket arithmetic inline: the general entry machinery (entries.lua) and its function
calls cost about as much again as the whole of this. Mirrors bucket_level, bucket_wait,
bucket_add and bucket_ttl of _algorithms.py, as entries.lua does.

KEYS[1]      the op key, as in prelude.lua; the op is the lease
KEYS[2]      `{ns}:b:<key>`, the hash of every entry
ARGV         as acquire.lua's, each entry "2:0:cap_mt:refill_mt:period_ms:amount_mt:name"

Returns as acquire.lua does.
]]

local now = clock()
local hash = KEYS[2]
local max_wait = num(ARGV[2])

-- Each entry's numbers (four a bucket, in `specs`) and fields, and its stored state from
-- one HMGET. The pattern admits digits only, so '+ 0' converts (at half the cost of
-- calling tonumber).
local specs, fields = {}, {}
for j = 5, #ARGV do
  local cap, refill, period, amount, name =
    string.match(ARGV[j], '^2:0:(%d+):([1-9]%d*):([1-9]%d*):(%d+):(.+)$')
  if not name then return malformed(ARGV[j]) end
  cap, refill, period, amount = cap + 0, refill + 0, period + 0, amount + 0
  if cap + refill * period + amount >= LIMIT then return malformed(ARGV[j]) end
  local k = #specs
  specs[k + 1], specs[k + 2], specs[k + 3], specs[k + 4] = cap, refill, period, amount
  fields[#fields + 1], fields[#fields + 2] = 'b:' .. name, 'b@' .. name
end
local n = #specs / 4
if n == 0 then return error('taskthrottle: no entries') end
fields[2 * n + 1], fields[2 * n + 2] = 'x', 'p'
local stored = redis.call('HMGET', hash, unpack(fields))
-- A pushback (pushback.lua) adds its hold to every bucket's wait.
local held = (tonumber(stored[2 * n + 2]) or 0) - now

-- set: the new state, as HSET takes it; ttl: when the last bucket is full again;
-- refused: the index and wait of each bucket that refuses.
local set, ttl, refused, delay = {}, 0, {}, 0
for j = 1, n do
  local cap, refill, period, amount = specs[4 * j - 3], specs[4 * j - 2], specs[4 * j - 1],
    specs[4 * j]
  -- The level now: whole periods are folded into the anchor; a full bucket has no state.
  local debit, anchor = tonumber(stored[2 * j - 1]), tonumber(stored[2 * j])
  local used = 0
  if debit and anchor then
    used = debit
    if now > anchor then
      local periods = floor((now - anchor) / period)
      debit, anchor = debit - periods * refill, anchor + periods * period
      used = debit - floor((now - anchor) * refill / period)
    end
  end
  if used <= 0 then debit, anchor, used = 0, now, 0 end
  local elapsed = now > anchor and now - anchor or 0
  local wait = held
  if used + amount > cap then
    -- the time until debit - cap + amount millitokens have refilled
    local needed = debit - cap + amount
    local periods = floor(needed / refill)
    wait = max(wait, periods * period + math.ceil((needed - periods * refill) * period / refill)
      - elapsed)
  end
  if wait > 0 then
    delay = max(delay, wait)
    if wait > max_wait then refused[#refused + 1], refused[#refused + 2] = j, wait end
  end
  if amount > 0 then
    debit = debit + amount
    local k = #set
    set[k + 1], set[k + 2], set[k + 3], set[k + 4] = fields[2 * j - 1], debit, fields[2 * j], anchor
    local periods = floor(debit / refill)
    ttl = max(ttl, periods * period + math.ceil((debit - periods * refill) * period / refill)
      - elapsed)
  end
end

local early = answer_before_writing(refused, delay, now)
if early then return early end

if #set > 0 then
  -- The hash outlives its state by a minute, so that a busy key is extended once a minute;
  -- a debt that takes longer than MAX_EXPIRY to repay is kept that long.
  ttl = min(ttl, MAX_EXPIRY)
  local extend = now + ttl > (tonumber(stored[2 * n + 1]) or 0)
  if extend then set[#set + 1], set[#set + 2] = 'x', now + ttl + EXPIRY_SLACK end
  redis.call('HSET', hash, unpack(set))
  if extend then redis.call('PEXPIRE', hash, expiry_arg(ttl + EXPIRY_SLACK)) end
end
if delay == 0 then return now end
return {1, delay, now}
