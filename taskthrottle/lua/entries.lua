--[[ entries.lua: entries of every kind, and their arithmetic, for acquire.lua, settle.lua
and peek.lua (after prelude.lua, whose header describes keys and entries).

An entry is a positional table (a third of the cost of one with named fields, and every
call builds one per limit), its slots named below.
]]

-- Milliseconds from the anchor until `needed` millitokens have refilled.
local function refill_time(needed, refill, period)
  local whole_periods = floor(needed / refill)
  return whole_periods * period + math.ceil((needed - whole_periods * refill) * period / refill)
end

-- A bucket's (debit, anchor, used) at now, from its stored debit and anchor (nil, nil, 0
-- when full). Mirrors bucket_level of _algorithms.py.
local function bucket_level(debit, anchor, now, refill, period)
  if not (debit and anchor) then return nil, nil, 0 end
  local used = debit
  if now > anchor then
    local periods = floor((now - anchor) / period)
    debit, anchor = debit - periods * refill, anchor + periods * period
    used = debit - floor((now - anchor) * refill / period)
  end
  if used <= 0 then return nil, nil, 0 end
  return debit, anchor, used
end

-- Milliseconds until `amount` fits. Mirrors bucket_wait of _algorithms.py.
local function bucket_wait(debit, anchor, used, now, cap, refill, period, amount)
  -- A full bucket (no state): 0, as in Python; only a settle asks with amount > cap.
  if not debit or used + amount <= cap then return 0 end
  return refill_time(debit - cap + amount, refill, period) - max(0, now - anchor)
end

-- Milliseconds until a bucket charged to `debit` since `anchor` is full again (at least
-- 1). Mirrors bucket_ttl of _algorithms.py.
local function bucket_ttl(debit, anchor, now, refill, period)
  return max(1, refill_time(debit, refill, period) - max(0, now - anchor))
end

-- FIELD and FIELD2 (and FIELD3 for a sliding window): the hash fields of a bucket or
-- window. VALUE and SINCE (and PREV): its stored state (a bucket's debit and anchor, a
-- fixed window's use and window, a sliding window's count, window and previous count;
-- nil when none), brought to now by `look`. USED: what the entry holds now. HELD: until
-- when (ms) a pushback holds off the entry's key (the hash's field "p", see
-- pushback.lua), 0 when none.
local KEY, KIND, CAP, REFILL, PERIOD, AMOUNT, NAME, FIELD, FIELD2 = 1, 2, 3, 4, 5, 6, 7, 8, 9
local VALUE, SINCE, USED, HELD, PREV, FIELD3 = 10, 11, 12, 13, 14, 15
local PREFIX = {['0'] = 'b', ['2'] = 'q', ['3'] = 's'}

-- An entry of the hash or zset named `key`, from its numbers as text; nil when malformed.
local function new_entry(key, kind, cap, refill, period, amount, name)
  local e = {key, tonumber(kind), tonumber(cap), tonumber(refill), tonumber(period),
    tonumber(amount), name, false, false, nil, nil, 0, 0, 0, false}
  if not (key and e[CAP] and e[CAP] + e[REFILL] * e[PERIOD] + math.abs(e[AMOUNT]) < LIMIT
      and (kind ~= '3' or e[CAP] * e[PERIOD] + math.abs(e[AMOUNT]) < LIMIT)) then
    return nil
  end
  if kind ~= '1' then
    local prefix = PREFIX[kind]
    e[FIELD], e[FIELD2] = prefix .. ':' .. name, prefix .. '@' .. name
    if kind == '3' then e[FIELD3] = 's%' .. name end
  end
  return e
end

-- Files a bucket or window entry under its hash in `hashes`, a list of {key, expiry,
-- entry, entry, ...} (`by_key` finds each).
local function add_to_hash(e, hashes, by_key)
  local hash = by_key[e[KEY]]
  if not hash then
    hash = {e[KEY], 0}
    by_key[e[KEY]] = hash
    hashes[#hashes + 1] = hash
  end
  hash[#hash + 1] = e
end

-- Reads the state of every entry of `hashes`, one HMGET per hash.
local function load_hashes(hashes)
  for _, hash in ipairs(hashes) do
    local fields, n, at = {}, #hash, 0
    for j = 3, n do
      local e = hash[j]
      fields[at + 1], fields[at + 2], at = e[FIELD], e[FIELD2], at + 2
      if e[FIELD3] then fields[at + 1], at = e[FIELD3], at + 1 end
    end
    fields[at + 1], fields[at + 2] = 'x', 'p'
    local values = redis.call('HMGET', hash[1], unpack(fields))
    local held = tonumber(values[#values]) or 0
    at = 0
    for j = 3, n do
      local e = hash[j]
      e[VALUE], e[SINCE], at = tonumber(values[at + 1]), tonumber(values[at + 2]), at + 2
      if e[FIELD3] then e[PREV], at = tonumber(values[at + 1]) or 0, at + 1 end
      e[HELD] = held
    end
    hash[2] = tonumber(values[#values - 1]) or 0
  end
end

-- The entries ARGV[first..], and the hashes they use, each read with one HMGET: a list of
-- {key, expiry, entry, entry, ...}.
local function read_entries(first)
  local entries, hashes, by_key = {}, {}, {}
  for i = first, #ARGV do
    local k, kind, cap, refill, period, amount, name =
      string.match(ARGV[i], '^(%d+):([0123]):(%d+):(%d+):(%d+):(%-?%d+):(.+)$')
    k = tonumber(k)
    local e = new_entry(k and k > 1 and KEYS[k], kind, cap, refill, period, amount, name)
    if not e then return malformed(ARGV[i]) end
    entries[#entries + 1] = e
    if kind ~= '1' then add_to_hash(e, hashes, by_key) end
  end
  load_hashes(hashes)
  return entries, hashes
end

-- Concurrency slots: besides a member per lease (see prelude.lua), a key's zset keeps per
-- limit name a member "#<name>" scored -1 - (slots_mt held), so that what is held is one
-- ZSCORE away instead of a sum over every lease. The negative score keeps it out of every
-- range of expiries. Leases that expired still count in it until an acquire prunes them.

-- The member of e's slots held by `lease`.
local function slot_member(e, lease)
  return string.format('%s:%.0f:%s', e[NAME], e[AMOUNT], lease)
end

-- The slots_mt that `lease` holds of e now (0 when none, or when they expired).
local function slots_own(e, lease, now)
  local score = redis.call('ZSCORE', e[KEY], slot_member(e, lease))
  if score and tonumber(score) > now then return e[AMOUNT] end
  return 0
end

-- The slots_mt recorded as held by `name` under `key`.
local function slots_held(key, name)
  local score = redis.call('ZSCORE', key, '#' .. name)
  return score and -1 - tonumber(score) or 0
end

-- The members of expired leases under `key`, and the slots_mt they hold per name.
local function slots_expired(key, now)
  local members = redis.call('ZRANGEBYSCORE', key, 0, string.format('%.0f', now))
  local by_name = {}
  for _, member in ipairs(members) do
    local name, weight = string.match(member, '^([^:]+):(%d+):')
    by_name[name] = (by_name[name] or 0) + tonumber(weight)
  end
  return members, by_name
end

-- Records `delta` more slots_mt held by `name` under `key`.
local function slots_count(key, name, delta)
  local held = slots_held(key, name) + delta
  if held > 0 then
    redis.call('ZADD', key, -1 - held, '#' .. name)
  else
    redis.call('ZREM', key, '#' .. name)
  end
end

-- Forgets the expired leases under `key`, and the slots they held.
local function slots_prune(key, now)
  local members, by_name = slots_expired(key, now)
  if #members == 0 then return end
  for name, weight in pairs(by_name) do slots_count(key, name, -weight) end
  redis.call('ZREMRANGEBYSCORE', key, 0, string.format('%.0f', now))
end

-- Milliseconds until `amount` more slots of e fit, `used` being held now by other leases
-- than the member `own` (nil when none): the expiry of the lease at which enough would be
-- free, the live leases read in order of expiry (those of every name under the key: one
-- zset holds them). At most SLOTS_READ are read, so that a refusal costs the same with
-- 20,000 holders as with one; when they free too little (a request of many slots, a cap
-- lowered below what is held), the answer is a conservative guess rather than a scan:
-- `ttl`, or the expiry of the last lease read if later. Mirrors slots_wait of
-- _algorithms.py.
local function slots_wait(e, now, used, amount, own, ttl)
  local prefix = e[NAME] .. ':'
  local members = redis.call('ZRANGEBYSCORE', e[KEY], string.format('(%.0f', now), '+inf',
    'WITHSCORES', 'LIMIT', 0, SLOTS_READ)
  local wait = 0
  for i = 1, #members, 2 do
    local member = members[i]
    wait = tonumber(members[i + 1]) - now
    if string.sub(member, 1, #prefix) == prefix and member ~= own then
      used = used - tonumber(string.match(member, '^(%d+):', #prefix + 1))
      if used + amount <= e[CAP] then return max(1, wait) end
    end
  end
  if #members < 2 * SLOTS_READ then
    return error('taskthrottle: slots requested exceed the capacity')
  end
  return max(1, ttl, wait)
end

-- A fixed window's use and window at now, debt carried (VALUE, SINCE as read), into USED
-- and SINCE; the wait (ms) before `amount` fits. Mirrors window_level and window_wait of
-- _algorithms.py.
local function window_look(e, now, amount)
  local cap, period = e[CAP], e[PERIOD]
  local used, window = e[VALUE], e[SINCE]
  if not (used and window) then
    used, window = 0, floor(now / period)
  else
    local passed = floor(now / period) - window
    if passed > 0 then
      if passed >= math.ceil(used / cap) then used = 0 else used = used - passed * cap end
      window = window + passed
    end
  end
  e[USED], e[SINCE] = used, window
  if used + amount <= cap then return 0 end
  return (window + math.ceil((used + amount - cap) / cap)) * period - now
end

-- A sliding window's count, previous count and window at now (VALUE, PREV, SINCE), and
-- what it holds (USED); the wait (ms) before `amount` fits. Mirrors sliding_level and
-- sliding_wait of _algorithms.py.
local function sliding_look(e, now, amount)
  local cap, period = e[CAP], e[PERIOD]
  local count, previous, window = e[VALUE], e[PREV], e[SINCE]
  if not (count and window) then
    count, previous, window = 0, 0, floor(now / period)
  else
    local passed = floor(now / period) - window
    if passed > 0 then
      if passed > math.ceil(count / cap) + 1 then
        count, previous = 0, 0
      else
        previous = min(cap, max(0, count - (passed - 1) * cap))
        count = max(0, count - passed * cap)
      end
      window = window + passed
    end
  end
  local elapsed = max(0, now - window * period)
  local used = count + previous - floor(previous * elapsed / period)
  e[VALUE], e[PREV], e[SINCE], e[USED] = count, previous, window, used
  if used + amount <= cap then return 0 end
  amount = min(amount, cap)  -- only a settle asks with more, and reads no wait
  local first = 0
  if count + amount > cap then first = math.ceil((count + amount - cap) / cap) end
  for ahead = first, first + 1 do
    local count_then, previous_then = count, previous
    if ahead > 0 then
      count_then = max(0, count - ahead * cap)
      previous_then = min(cap, max(0, count - (ahead - 1) * cap))
    end
    local room, at = cap - amount - count_then, nil
    if previous_then <= room then
      at = 0
    elseif room > 0 then
      at = math.ceil((previous_then - room) * period / previous_then)
    end
    if at then return (window + ahead) * period + at - now end
  end
  return error('taskthrottle: no window fits a sliding window entry')
end

-- The wait for e's slots (see `look`).
local function slots_look(e, now, lease, ttl)
  local amount, cap = e[AMOUNT], e[CAP]
  -- An acquire (given a `lease`) forgets the expired leases first, whether it is granted
  -- or refused: invisible, as they no longer count, and a refusal that kept them would
  -- read them all again on every call. A peek writes nothing: it discounts them.
  local used
  if lease then
    slots_prune(e[KEY], now)
    used = slots_held(e[KEY], e[NAME])
  else
    local _, expired = slots_expired(e[KEY], now)
    used = slots_held(e[KEY], e[NAME]) - (expired[e[NAME]] or 0)
  end
  e[USED] = used
  if used + amount <= cap then return 0 end
  -- A lease acquiring again while it holds its slots only moves their expiry (see
  -- hold_slots): what it holds is not in its way. Read only when it could matter.
  local own = lease and slots_own(e, lease, now) or 0
  if used - own + amount <= cap then return 0 end
  return slots_wait(e, now, used - own, amount, own > 0 and slot_member(e, lease) or nil, ttl)
end

-- Milliseconds a pushback (pushback.lua) still holds off the key of e's slots: it lives
-- in the key's hash, which the client declares among the KEYS of a request with slots.
local function pushed_back(e, now)
  local tag_end = string.find(e[KEY], '}:c:', 1, true)
  if not tag_end then return 0 end
  local hash = string.sub(e[KEY], 1, tag_end) .. ':b:' .. string.sub(e[KEY], tag_end + 4)
  return (tonumber(redis.call('HGET', hash, 'p')) or 0) - now
end

-- Brings e's state to `now` and returns the wait (ms) before e's amount fits; the slots
-- that `lease` (nil for none) holds of e already do not count against it, and a wait for
-- slots past what SLOTS_READ leases tell is `ttl` (see slots_wait). Mirrors
-- _algorithms.py.
-- An acquire is held off by a pushback on every entry's key, slots included.
local function look(e, now, lease, ttl)
  local kind, amount, cap = e[KIND], e[AMOUNT], e[CAP]
  if kind == 0 then
    local debit, anchor, used = bucket_level(e[VALUE], e[SINCE], now, e[REFILL], e[PERIOD])
    e[VALUE], e[SINCE], e[USED] = debit, anchor, used
    return max(bucket_wait(debit, anchor, used, now, cap, e[REFILL], e[PERIOD], amount),
      e[HELD] - now)
  elseif kind == 2 then
    return max(window_look(e, now, amount), e[HELD] - now)
  elseif kind == 3 then
    return max(sliding_look(e, now, amount), e[HELD] - now)
  end
  return max(slots_look(e, now, lease, ttl), lease and pushed_back(e, now) or 0)
end

-- Holds the slots of every concurrency entry for `lease` until now + held, as `look` left
-- them (they fit, the expired pruned): a new member is counted, while a lease holding its
-- member already (it acquires again) only moves its expiry.
local function hold_slots(entries, now, held, lease)
  local expire = min(held, MAX_EXPIRY)
  for _, e in ipairs(entries) do
    if e[KIND] == 1 then
      local added = redis.call('ZADD', e[KEY], now + held, slot_member(e, lease))
      redis.call('ZADD', e[KEY], -1 - (e[USED] + added * e[AMOUNT]), '#' .. e[NAME])
      if redis.call('PTTL', e[KEY]) < expire then
        redis.call('PEXPIRE', e[KEY], expiry_arg(expire))
      end
    end
  end
end

-- Adds each entry's amount to the buckets and quotas of `hashes`, as `look` left them,
-- with one HSET (and HDEL) per hash; a hash whose state would outlive its expiry gets a
-- later one. Mirrors bucket_add of _algorithms.py.
local function charge(hashes, now)
  for _, hash in ipairs(hashes) do
    local set, del, ttl = {}, {}, 0
    for j = 3, #hash do
      local e = hash[j]
      local amount = e[AMOUNT]
      if amount == 0 then
        -- nothing changes
      elseif e[KIND] == 3 then
        local count = max(0, e[VALUE] + amount)
        if count == 0 and e[PREV] == 0 then
          del[#del + 1], del[#del + 2], del[#del + 3] = e[FIELD], e[FIELD2], e[FIELD3]
        else
          local n = #set
          set[n + 1], set[n + 2], set[n + 3], set[n + 4] = e[FIELD], count, e[FIELD2], e[SINCE]
          set[n + 5], set[n + 6] = e[FIELD3], e[PREV]
          ttl = max(ttl, (e[SINCE] + math.ceil(count / e[CAP]) + 1) * e[PERIOD] - now)
        end
      elseif e[USED] + amount <= 0 then
        del[#del + 1], del[#del + 2] = e[FIELD], e[FIELD2]
      else
        local value, since
        if e[KIND] == 0 then
          since = e[VALUE] and e[SINCE] or now
          value = (e[VALUE] or 0) + amount
          ttl = max(ttl, bucket_ttl(value, since, now, e[REFILL], e[PERIOD]))
        else
          since, value = e[SINCE], e[USED] + amount
          ttl = max(ttl, (since + math.ceil(value / e[CAP])) * e[PERIOD] - now)
        end
        local n = #set
        set[n + 1], set[n + 2], set[n + 3], set[n + 4] = e[FIELD], value, e[FIELD2], since
      end
    end
    ttl = min(ttl, MAX_EXPIRY)  -- a debt that takes longer to repay is kept this long
    local extend = ttl > 0 and now + ttl > hash[2]
    if extend then
      set[#set + 1], set[#set + 2] = 'x', now + ttl + EXPIRY_SLACK
    end
    if #set > 0 then redis.call('HSET', hash[1], unpack(set)) end
    if #del > 0 then redis.call('HDEL', hash[1], unpack(del)) end
    if extend then redis.call('PEXPIRE', hash[1], expiry_arg(ttl + EXPIRY_SLACK)) end
  end
end
