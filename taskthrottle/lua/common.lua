--[[ common.lua: helpers every script starts with (prepended when the scripts load, after
the constant the client shares, OP_MEMORY_MS).

KEYS[1], KEYS[2]  `{ns}:ops:0`, `{ns}:ops:1`: HASHes of op id -> its turn (ms) for windows
                  of 2 * OP_MEMORY_MS taking turns, each expiring a window after its own, so
                  that an id is remembered for at least OP_MEMORY_MS without a key per id
KEYS[3..]         the keys entries name by index: `{ns}:b:<key>`, a HASH of buckets
                  ("b:<name>" = "debit_mt:anchor_ms"), quotas ("q:<name>" =
                  "used_mt:window"), "x" = the hash's expiry (ms) and "w" = the last op
                  window whose hash got its expiry from a call on this key: both spare a
                  PEXPIRE on almost every call; and `{ns}:c:<key>`,
                  a ZSET of concurrency slots, member "<name>:<slots_mt>:<lease id>",
                  score = expiry (ms)
An entry is one ARGV "i:kind:cap_mt:refill_mt:period_ms:amount_mt:name": KEYS[i] holds it
(the hash for kind 0, a bucket, and kind 2, a quota; the zset for kind 1, concurrency).
Amounts may be negative in settle.lua.

Numbers are Lua doubles: every integer here stays below 2^53 (the client checks, and so
does read_entries), so floor(a / b) is exact. Numbers are written with '%.0f', or handed
to redis.call as numbers, because tostring keeps only 14 digits.

Scripts read TIME before they write, which Redis allows since it replicates a script's
effects rather than the script (the only way since Redis 7, the default since 5).

These definitions run on every call, and converting between text and numbers costs more
than arithmetic here, so the hot path converts each number once.
]]

local OP_WINDOW = 2 * OP_MEMORY_MS
-- A hash's expiry is pushed this far past what its state needs, so that a busy key is
-- extended about once a minute rather than on every write.
local EXPIRY_SLACK = 60000

local function num(text)
  local value = tonumber(text)
  if value == nil or value ~= value or math.abs(value) >= 9007199254740992 then
    return error('taskthrottle: not a finite number below 2^53: ' .. tostring(text))
  end
  return value
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

-- Milliseconds from the anchor until `needed` millitokens have refilled.
local function refill_time(needed, refill, period)
  local whole = math.floor(needed / refill)
  return whole * period + math.ceil((needed - whole * refill) * period / refill)
end

-- The entries ARGV[first..], each with the raw value of its field, and `hashes`, from
-- one HMGET per hash: hashes[key] = {expiry, op window marker}; hashes[1] = the first key.
local function read_entries(first)
  local entries, groups, hashes = {}, {}, {}
  for i = first, #ARGV do
    local k, kind, cap, refill, period, amount, name =
      string.match(ARGV[i], '^(%d+):([012]):(%d+):(%d+):(%d+):(%-?%d+):(.+)$')
    k = tonumber(k)
    local key = k and k > 2 and KEYS[k]
    if not key then return error('taskthrottle: malformed entry: ' .. ARGV[i]) end
    local e = {
      key = key, kind = tonumber(kind), name = name, field = name, raw = false,
      cap = tonumber(cap), refill = tonumber(refill), period = tonumber(period),
      amount = tonumber(amount), state = false, used = 0,
    }
    if e.cap + e.refill * e.period + math.abs(e.amount) >= 9007199254740992 then
      return error('taskthrottle: not a finite number below 2^53: ' .. ARGV[i])
    end
    entries[#entries + 1] = e
    if e.kind ~= 1 then
      e.field = (e.kind == 0 and 'b:' or 'q:') .. name
      local group = groups[key]
      if not group then
        group = {}
        groups[key] = group
        hashes[#hashes + 1] = key
      end
      group[#group + 1] = e
    end
  end
  for _, key in ipairs(hashes) do
    local group, fields = groups[key], {}
    for j, e in ipairs(group) do fields[j] = e.field end
    fields[#group + 1], fields[#group + 2] = 'x', 'w'
    local values = redis.call('HMGET', key, unpack(fields))
    for j, e in ipairs(group) do e.raw = values[j] end
    hashes[key] = {tonumber(values[#group + 1]) or 0, tonumber(values[#group + 2])}
  end
  return entries, hashes
end

-- Live slots of a concurrency entry: a list of {slots, expiry} sorted by expiry, and the
-- slots they hold.
local function slots_live(e, now)
  local members = redis.call('ZRANGEBYSCORE', e.key, string.format('(%.0f', now), '+inf',
    'WITHSCORES')
  local prefix = e.name .. ':'
  local live, used = {}, 0
  for i = 1, #members, 2 do
    local member = members[i]
    if string.sub(member, 1, #prefix) == prefix then
      local weight = tonumber(string.match(member, '^(%d+):', #prefix + 1))
      live[#live + 1] = {weight, tonumber(members[i + 1])}
      used = used + weight
    end
  end
  return live, used
end

-- Reads e's state at `now` into e.state (a bucket's {debit, anchor}, false when full; a
-- quota's window; the live slots) and e.used, and returns the wait (ms) before e.amount
-- fits. Mirrors bucket_level, bucket_wait, quota_used, quota_wait and slots_wait of
-- _algorithms.py.
local function look(e, now)
  if e.kind == 0 then
    if not e.raw then return 0 end
    local debit, anchor = pair(e.raw)
    local used = debit
    if now > anchor then
      local whole = math.floor((now - anchor) / e.period)
      debit, anchor = debit - whole * e.refill, anchor + whole * e.period
      used = debit - math.floor((now - anchor) * e.refill / e.period)
    end
    if used <= 0 then return 0 end
    e.state, e.used = {debit, anchor}, used
    if used + e.amount <= e.cap then return 0 end
    return refill_time(debit - e.cap + e.amount, e.refill, e.period) - math.max(0, now - anchor)
  elseif e.kind == 2 then
    if e.raw then
      local used, window = pair(e.raw)
      if window == math.floor(now / e.period) then e.used = used end
    end
    if e.used + e.amount <= e.cap then return 0 end
    return (math.floor(now / e.period) + 1) * e.period - now
  end
  local live, used = slots_live(e, now)
  e.state, e.used = live, used
  if used + e.amount <= e.cap then return 0 end
  for _, lease in ipairs(live) do
    used = used - lease[1]
    if used + e.amount <= e.cap then return math.max(1, lease[2] - now) end
  end
  return error('taskthrottle: slots requested exceed the capacity')
end

-- Adds e.amount to the bucket or quota `look` read, gathering the writes per hash in
-- `writes`. Mirrors bucket_add and bucket_ttl of _algorithms.py.
local function charge(e, now, writes)
  local value, ttl
  if e.used + e.amount > 0 then
    if e.kind == 0 then
      local s = e.state or {0, now}
      local debit = s[1] + e.amount
      value = string.format('%.0f:%.0f', debit, s[2])
      ttl = math.max(1, refill_time(debit, e.refill, e.period) - math.max(0, now - s[2]))
    else
      local window = math.floor(now / e.period)
      value = string.format('%.0f:%.0f', e.used + e.amount, window)
      ttl = (window + 1) * e.period - now
    end
  end
  local w = writes[e.key] or {set = {}, del = {}, ttl = 0}
  writes[e.key] = w
  if value then
    w.set[#w.set + 1] = e.field
    w.set[#w.set + 1] = value
    w.ttl = math.max(w.ttl, ttl)
  else
    w.del[#w.del + 1] = e.field
  end
end

-- Applies `writes`; a hash whose state would outlive its expiry gets a later one.
local function flush(writes, hashes, now)
  for key, w in pairs(writes) do
    local extend = w.ttl > 0 and now + w.ttl > hashes[key][1]
    if extend then
      w.set[#w.set + 1] = 'x'
      w.set[#w.set + 1] = now + w.ttl + EXPIRY_SLACK
    end
    if #w.set > 0 then redis.call('HSET', key, unpack(w.set)) end
    if #w.del > 0 then redis.call('HDEL', key, unpack(w.del)) end
    if extend then redis.call('PEXPIRE', key, w.ttl + EXPIRY_SLACK) end
  end
end

-- The turn an earlier run of op `id` recorded in `hash`, if recorded within the window (an
-- injected clock in tests can outrun Redis' own expiry of the hashes).
local function op_turn(hash, id, now)
  local turn = tonumber(redis.call('HGET', hash, id))
  if turn and turn + OP_WINDOW > now then return turn end
  return nil
end

-- The turn an earlier run of op `id` recorded, or nil. The previous window's hash matters
-- only in the first OP_MEMORY_MS of the current window.
local function op_recall(id, now)
  local window = math.floor(now / OP_WINDOW)
  local turn = op_turn(KEYS[1 + window % 2], id, now)
  if turn or now - window * OP_WINDOW >= OP_MEMORY_MS then return turn end
  return op_turn(KEYS[2 - window % 2], id, now)
end

-- Records op `id` with its `turn` and returns nil, or returns the turn an earlier run of
-- the same id recorded, recording nothing. The current window's hash gets its expiry
-- unless the first hash of the call says that a call this window saw to it (it cannot
-- expire before the window ends); `writes` then carries the new marker.
local function op_claim(id, turn, now, hashes, writes)
  local window = math.floor(now / OP_WINDOW)
  local current = KEYS[1 + window % 2]
  if now - window * OP_WINDOW < OP_MEMORY_MS then
    local earlier = op_turn(KEYS[2 - window % 2], id, now)
    if earlier then return earlier end
  end
  if redis.call('HSETNX', current, id, turn) == 0 then
    local earlier = op_turn(current, id, now)
    if earlier then return earlier end
    redis.call('HSET', current, id, turn)
  end
  local marked = hashes[1]
  if not (marked and hashes[marked][2] == window) then
    redis.call('PEXPIRE', current, (window + 2) * OP_WINDOW - now)
    if marked then
      local w = writes[marked] or {set = {}, del = {}, ttl = 0}
      writes[marked] = w
      w.set[#w.set + 1] = 'w'
      w.set[#w.set + 1] = window
    end
  end
  return nil
end

local function slot_member(e, lease)
  return string.format('%s:%.0f:%s', e.name, e.amount, lease)
end
