--[[ common.lua: helpers every script starts with (prepended when the scripts load).

KEYS[1], KEYS[2]   `{ns}:ops:0`, `{ns}:ops:1`: HASHes of recent op ids, one per
                   alternate minute (field "_w" = its minute), so an id is remembered
                   for one to two minutes without a key per id
KEYS[2k+1]         `{ns}:b:<key k>`: HASH of buckets ("b:<name>" = "debit_mt:anchor_ms")
                   and quotas ("q:<name>" = "used_mt:window"); PEXPIRE until all are full
KEYS[2k+2]         `{ns}:c:<key k>`: ZSET of concurrency slots, member
                   "<name>:<slots_mt>:<lease id>", score = expiry ms
An entry is one ARGV "k:kind:cap_mt:refill_mt:period_ms:amount_mt:name" (kind 0 bucket,
1 concurrency, 2 quota; amount may be negative in settle.lua).

Numbers are Lua doubles: every integer here stays below 2^53 (the client checks
amounts, and a limit's refill * period), so floor(a / b) is exact. Numbers are
written back with '%.0f' because tostring keeps only 14 digits.
]]

if redis.replicate_commands then redis.replicate_commands() end

local function num(text)
  local value = tonumber(text)
  if value == nil or value ~= value or math.abs(value) >= 9007199254740992 then
    return error('taskthrottle: not a finite number below 2^53: ' .. tostring(text))
  end
  return value
end

local function fmt(value)
  return string.format('%.0f', value)
end

-- "a:b", the form of every stored pair
local function fmt2(a, b)
  return string.format('%.0f:%.0f', a, b)
end

local function clock()
  if ARGV[1] ~= '' then return num(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- "a:b" -> a, b (both numbers)
local function pair(raw)
  local sep = string.find(raw, ':', 1, true)
  return tonumber(string.sub(raw, 1, sep - 1)), tonumber(string.sub(raw, sep + 1))
end

-- Mirrors _algorithms.bucket_level: {debit, anchor, used}, or nil when full.
local function bucket_level(raw, now, refill, period)
  if not raw then return nil end
  local debit, anchor = pair(raw)
  local used = debit
  if now > anchor then
    local whole = math.floor((now - anchor) / period)
    if whole > 0 then
      debit = debit - whole * refill
      anchor = anchor + whole * period
    end
    used = debit - math.floor((now - anchor) * refill / period)
  end
  if used <= 0 then return nil end
  return {debit, anchor, used}
end

local function refill_time(needed, refill, period)
  local whole = math.floor(needed / refill)
  local rest = needed - whole * refill
  return whole * period + math.ceil(rest * period / refill)
end

local function bucket_wait(level, now, cap, refill, period, amount)
  if not level or level[3] + amount <= cap then return 0 end
  return refill_time(level[1] - cap + amount, refill, period) - math.max(0, now - level[2])
end

-- Mirrors _algorithms.bucket_add: the new {debit, anchor}, or nil when full.
local function bucket_add(level, now, amount)
  if not level then
    if amount > 0 then return {amount, now} end
    return nil
  end
  if level[3] + amount <= 0 then return nil end
  return {level[1] + amount, level[2]}
end

local function bucket_ttl(state, now, refill, period)
  return math.max(1, refill_time(state[1], refill, period) - math.max(0, now - state[2]))
end

local function quota_used(raw, now, period)
  if not raw then return 0 end
  local used, window = pair(raw)
  if window ~= math.floor(now / period) then return 0 end
  return used
end

local function quota_wait(used, now, cap, period, amount)
  if used + amount <= cap then return 0 end
  return (math.floor(now / period) + 1) * period - now
end

-- Live slots of one concurrency limit: a list of {slots, expiry} sorted by expiry.
local function slots_live(zkey, name, now)
  local members = redis.call('ZRANGEBYSCORE', zkey, '(' .. fmt(now), '+inf', 'WITHSCORES')
  local prefix = name .. ':'
  local live = {}
  for i = 1, #members, 2 do
    local member = members[i]
    if string.sub(member, 1, #prefix) == prefix then
      local rest = string.sub(member, #prefix + 1)
      local weight = tonumber(string.sub(rest, 1, string.find(rest, ':', 1, true) - 1))
      live[#live + 1] = {weight, tonumber(members[i + 1])}
    end
  end
  return live
end

local function slots_used(live)
  local used = 0
  for _, lease in ipairs(live) do used = used + lease[1] end
  return used
end

local function slots_wait(live, now, cap, amount)
  local used = slots_used(live)
  if used + amount <= cap then return 0 end
  for _, lease in ipairs(live) do
    used = used - lease[1]
    if used + amount <= cap then return math.max(1, lease[2] - now) end
  end
  return error('taskthrottle: slots requested exceed the capacity')
end

-- Keep `key` alive for at least `ms` milliseconds.
local function keep(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, fmt(math.max(1, ms))) end
end

-- The entries ARGV[first..], each with the current value of its bucket or quota field,
-- read in one HMGET per hash.
local function read_entries(first)
  local entries, fields, order = {}, {}, {}
  for i = first, #ARGV do
    local k, kind, cap, refill, period, amount, name =
      string.match(ARGV[i], '^(%d+):(%d):(%d+):(%d+):(%d+):(%-?%d+):(.+)$')
    if not name then return error('taskthrottle: malformed entry: ' .. ARGV[i]) end
    k, kind = tonumber(k), tonumber(kind)
    local e = {
      hkey = KEYS[2 * k + 1], zkey = KEYS[2 * k + 2], name = name, kind = kind,
      cap = num(cap), refill = num(refill), period = num(period), amount = num(amount),
      field = (kind == 2 and 'q:' or 'b:') .. name,
    }
    entries[#entries + 1] = e
    if kind ~= 1 then
      local group = fields[e.hkey]
      if not group then
        group = {}
        fields[e.hkey] = group
        order[#order + 1] = e.hkey
      end
      group[#group + 1] = e
    end
  end
  for _, hkey in ipairs(order) do
    local names = {}
    for j, e in ipairs(fields[hkey]) do names[j] = e.field end
    local values = redis.call('HMGET', hkey, unpack(names))
    for j, e in ipairs(fields[hkey]) do e.raw = values[j] end
  end
  return entries
end

-- Op ids live in two hashes that take turns by minute: the current one and the last.
local function op_window(now, memory)
  local window = math.floor(now / memory)
  return window, KEYS[(window % 2) + 1], KEYS[((window + 1) % 2) + 1]
end

-- The value stored for `id` within the last one to two op windows (or nil), and whether
-- the current window's hash is stale (left from two windows ago, or missing).
local function op_recall(id, now, memory)
  local window, current, previous = op_window(now, memory)
  local got = redis.call('HMGET', current, '_w', id)
  local stale = got[1] ~= fmt(window)
  if not stale and got[2] then return got[2], stale end
  got = redis.call('HMGET', previous, '_w', id)
  if got[1] == fmt(window - 1) and got[2] then return got[2], stale end
  return nil, stale
end

local function op_remember(id, value, now, memory, stale)
  local window, current = op_window(now, memory)
  if stale then
    redis.call('DEL', current)  -- two windows old: everything in it is forgotten
    redis.call('HSET', current, '_w', fmt(window), id, value)
    redis.call('PEXPIRE', current, fmt(2 * memory))
  else
    redis.call('HSET', current, id, value)
  end
end

-- The wait (ms) before entry `e` could take its amount, and its current state.
local function look(e, now)
  if e.kind == 0 then
    local level = bucket_level(e.raw, now, e.refill, e.period)
    return bucket_wait(level, now, e.cap, e.refill, e.period, e.amount), level
  elseif e.kind == 2 then
    local used = quota_used(e.raw, now, e.period)
    return quota_wait(used, now, e.cap, e.period, e.amount), used
  end
  local live = slots_live(e.zkey, e.name, now)
  return slots_wait(live, now, e.cap, e.amount), live
end

-- Writes gathered per hash, so that each hash costs one HSET and one expiry update.
local function hash_writes(writes, hkey)
  local w = writes[hkey]
  if not w then
    w = {set = {}, del = {}, ttl = 0}
    writes[hkey] = w
  end
  return w
end

-- Add `amount` to a bucket or quota entry found in `state`, into `writes`.
local function charge(e, state, now, amount, writes)
  local value, ttl
  if e.kind == 0 then
    local new = bucket_add(state, now, amount)
    if new then
      value, ttl = fmt2(new[1], new[2]), bucket_ttl(new, now, e.refill, e.period)
    end
  else
    local used, window = math.max(0, state + amount), math.floor(now / e.period)
    if used > 0 then value, ttl = fmt2(used, window), (window + 1) * e.period - now end
  end
  local w = hash_writes(writes, e.hkey)
  if value then
    w.set[#w.set + 1] = e.field
    w.set[#w.set + 1] = value
    w.ttl = math.max(w.ttl, ttl)
  else
    w.del[#w.del + 1] = e.field
  end
end

local function flush(writes)
  for hkey, w in pairs(writes) do
    if #w.set > 0 then redis.call('HSET', hkey, unpack(w.set)) end
    if #w.del > 0 then redis.call('HDEL', hkey, unpack(w.del)) end
    if w.ttl > 0 then keep(hkey, w.ttl) end
  end
end

local function slot_member(e, lease)
  return e.name .. ':' .. fmt(e.amount) .. ':' .. lease
end
