--[[ room.lua: a waiting room, as taskthrottle/_room.py orders it (after prelude.lua and
entries.lua). Requests that cannot pass wait as tickets; an admission grants, in order,
those that fit now.

KEYS[1]      join: the op of the lease, as acquire.lua's; admit and the others: unused
KEYS[2..]    join: the keys of the entries, as in prelude.lua
KEYS[#-6..#] the room `<r>` = `{ns}:room:<name>`:
             `<r>:q` ZSET waiting lease id -> its start (the order: start, then lease id)
             `<r>:t` HASH lease id -> its ticket, JSON {ref, flow, start, expires,
                     entries: {{key, "kind:cap:refill:period:amount:name"}, ...}}
             `<r>:f` HASH "f:<flow>" -> the start of the flow's next ticket; "v" -> the
                     virtual time, the start of the ticket admitted last
             `<r>:u` HASH resource ("<key>\n<name>") -> how many waiting tickets need it
             `<r>:g` ZSET granted lease id, not taken up yet -> until when the grant holds
             `<r>:o` ZSET granted lease id, not taken up yet -> when it is offered again
             `<r>:e` STRING set while anything waited; its absence while a caller knows
                     tickets waited means the room was lost (a restart, a flush)
ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      the operation: join | admit | admitted | waiting
ARGV[3..]    join:     lease id, ref, slot ttl ms, expires ms, op prefix, entries...
             admit:    most, slot ttl ms, grant ms, op prefix
             admitted: lease ids...
             waiting:  lease ids...

The tickets' keys and their ops' keys are read from the tickets, undeclared: every key
shares the namespace's hash tag, so on Redis Cluster they live in the script's slot.
Every key of the room expires a day after its last write; a ticket, at its own expiry.

join     returns now_ms when granted now (as acquire.lua with no wait), {3} when the lease
         was granted before (the caller acquires it again, which replays that grant),
         else {0, wait_ms, now_ms, i1, wait1, ...}: queued (or waiting already), with the
         wait its own limits give and the entries refusing it (1-based).
admit    returns {intact, waiting, lease id, ref, ...}: the tickets granted now and those
         granted before whose offer came again.
admitted returns 1.
waiting  returns {0 or 1, ...} per lease id.
]]

local now, op = clock(), ARGV[2]
local R = #KEYS - 6
local QUEUE, TICKETS, FLOWS, USING = KEYS[R], KEYS[R + 1], KEYS[R + 2], KEYS[R + 3]
local GRANTED, OFFERS, EPOCH = KEYS[R + 4], KEYS[R + 5], KEYS[R + 6]
local ROOM_TTL, SCAN, REOFFER_MS = 86400000, 64, 1000

local function keep(key)
  if redis.call('PTTL', key) < ROOM_TTL - 60000 then redis.call('PEXPIRE', key, ROOM_TTL) end
end

local function resource(e) return e[KEY] .. '\n' .. e[NAME] end

-- The resources a ticket needs, read from its text alone.
local function ticket_resources(ticket)
  local found = {}
  for i, pair in ipairs(ticket.entries) do
    found[i] = pair[1] .. '\n' .. string.match(pair[2], '^[0123]:%d+:%d+:%d+:%-?%d+:(.+)$')
  end
  return found
end

-- The user's key of a hash or zset name, `{ns}:b:<key>` or `{ns}:c:<key>`.
local function user_key(name)
  return string.sub(name, string.find(name, '}:', 1, true) + 4)
end

-- The entries of a ticket, and their hashes (state read).
local function ticket_entries(ticket)
  local entries, hashes, by_key = {}, {}, {}
  for _, pair in ipairs(ticket.entries) do
    local kind, cap, refill, period, amount, name =
      string.match(pair[2], '^([0123]):(%d+):(%d+):(%d+):(%-?%d+):(.+)$')
    local e = new_entry(pair[1], kind, cap, refill, period, amount, name)
    if not e then return malformed(pair[2]) end
    entries[#entries + 1] = e
    if kind ~= '1' then add_to_hash(e, hashes, by_key) end
  end
  load_hashes(hashes)
  return entries, hashes
end

local function count_using(needs, delta)
  for _, r in ipairs(needs) do
    if redis.call('HINCRBY', USING, r, delta) <= 0 then redis.call('HDEL', USING, r) end
  end
end

-- Takes a waiting ticket out of the queue (admitted, or expired).
local function unqueue(lease, needs)
  redis.call('ZREM', QUEUE, lease)
  count_using(needs, -1)
end

-- Forgets the flows that fell behind the virtual time, once there are many.
local function prune_flows()
  if redis.call('HLEN', FLOWS) <= 10000 then return end
  local virtual, all = tonumber(redis.call('HGET', FLOWS, 'v')) or 0, redis.call('HGETALL', FLOWS)
  for i = 1, #all, 2 do
    if all[i] ~= 'v' and tonumber(all[i + 1]) <= virtual then redis.call('HDEL', FLOWS, all[i]) end
  end
end

local function grant(entries, hashes, lease, ttl, op_key)
  redis.call('SET', op_key, now, 'PX', expiry_arg(OP_MEMORY_MS))
  hold_slots(entries, now, ttl, lease)
  charge(hashes, now)
end

if op == 'join' then
  local lease, ref, ttl, expires = ARGV[3], ARGV[4], num(ARGV[5]), num(ARGV[6])
  if op_recall(now) then return {3} end
  local entries, hashes = read_entries(7)
  local waiting = redis.call('ZSCORE', QUEUE, lease)
  local blocked = false
  for _, e in ipairs(entries) do
    if redis.call('HEXISTS', USING, resource(e)) == 1 then blocked = true end
  end
  local refused, delay = {}, 0
  for i, e in ipairs(entries) do
    local wait = look(e, now, lease, ttl)
    if wait > 0 then refused[#refused + 1], refused[#refused + 2] = i, wait end
    delay = max(delay, wait)
  end
  if not (waiting or blocked) and #refused == 0 then
    grant(entries, hashes, lease, ttl, KEYS[1])
    return now
  end
  if not waiting then
    local names, pairs_, seen, needs = {}, {}, {}, {}
    for i, e in ipairs(entries) do
      local k = user_key(e[KEY])
      if not seen[k] then seen[k], names[#names + 1] = true, k end
      pairs_[i], needs[i] = {e[KEY], string.match(ARGV[6 + i], '^%d+:(.+)$')}, resource(e)
    end
    table.sort(names)
    local flow = 'f:' .. table.concat(names, '|')
    local start = max(tonumber(redis.call('HGET', FLOWS, 'v')) or 0,
      tonumber(redis.call('HGET', FLOWS, flow)) or 0)
    redis.call('HSET', FLOWS, flow, start + 1)
    redis.call('ZADD', QUEUE, start, lease)
    redis.call('HSET', TICKETS, lease, cjson.encode({ref = ref, flow = flow,
      start = start, expires = now + expires, entries = pairs_}))
    count_using(needs, 1)
    prune_flows()
    redis.call('SET', EPOCH, 1)
    for _, key in ipairs({QUEUE, TICKETS, FLOWS, USING, EPOCH}) do keep(key) end
  end
  return refusal(refused, delay, now)
end

if op == 'admit' then
  local most, ttl, grant_ms, op_prefix = num(ARGV[3]), num(ARGV[4]), num(ARGV[5]), ARGV[6]
  -- Grants not taken up in time are given back: refunded, slots freed, lease forgotten.
  for _, lease in ipairs(redis.call('ZRANGEBYSCORE', GRANTED, '-inf', now, 'LIMIT', 0, SCAN)) do
    local text = redis.call('HGET', TICKETS, lease)
    if text then
      local entries, hashes = ticket_entries(cjson.decode(text))
      for _, e in ipairs(entries) do
        if e[KIND] == 1 then
          if redis.call('ZREM', e[KEY], slot_member(e, lease)) == 1 then
            slots_count(e[KEY], e[NAME], -e[AMOUNT])
          end
        else
          e[AMOUNT] = -e[AMOUNT]
          look(e, now)
        end
      end
      charge(hashes, now)
    end
    redis.call('DEL', op_prefix .. lease)
    redis.call('ZREM', GRANTED, lease)
    redis.call('ZREM', OFFERS, lease)
    redis.call('HDEL', TICKETS, lease)
  end
  local out = {redis.call('EXISTS', EPOCH), 0}
  local offered = 0
  for _, lease in ipairs(redis.call('ZRANGEBYSCORE', OFFERS, '-inf', now, 'LIMIT', 0, most)) do
    local ticket = cjson.decode(redis.call('HGET', TICKETS, lease) or '{"ref":""}')
    redis.call('ZADD', OFFERS, now + REOFFER_MS, lease)
    out[#out + 1], out[#out + 2], offered = lease, ticket.ref, offered + 1
  end
  local blocked, virtual = {}, tonumber(redis.call('HGET', FLOWS, 'v')) or 0
  for _, lease in ipairs(redis.call('ZRANGE', QUEUE, 0, SCAN - 1)) do
    local text = redis.call('HGET', TICKETS, lease)
    local ticket = text and cjson.decode(text)
    if not ticket then
      redis.call('ZREM', QUEUE, lease)
    else
      local needs = ticket_resources(ticket)
      if ticket.expires <= now then
        unqueue(lease, needs)
        redis.call('HDEL', TICKETS, lease)
      else
        local free = offered < most
        for _, r in ipairs(needs) do
          if blocked[r] then free = false end
        end
        local entries, hashes
        if free then
          entries, hashes = ticket_entries(ticket)
          for _, e in ipairs(entries) do
            if look(e, now, lease, ttl) > 0 then free = false end
          end
        end
        if free then
          grant(entries, hashes, lease, ttl, op_prefix .. lease)
          unqueue(lease, needs)
          virtual = max(virtual, ticket.start)
          redis.call('ZADD', GRANTED, now + grant_ms, lease)
          redis.call('ZADD', OFFERS, now + REOFFER_MS, lease)
          out[#out + 1], out[#out + 2], offered = lease, ticket.ref, offered + 1
        else
          for _, r in ipairs(needs) do blocked[r] = true end
        end
      end
    end
  end
  redis.call('HSET', FLOWS, 'v', virtual)
  for _, key in ipairs({GRANTED, OFFERS, FLOWS}) do keep(key) end
  out[2] = redis.call('ZCARD', QUEUE)
  return out
end

if op == 'admitted' then
  for i = 3, #ARGV do
    redis.call('ZREM', GRANTED, ARGV[i])
    redis.call('ZREM', OFFERS, ARGV[i])
    redis.call('HDEL', TICKETS, ARGV[i])
  end
  return 1
end

if op == 'waiting' then
  local out = {}
  for i = 3, #ARGV do
    out[#out + 1] = redis.call('ZSCORE', QUEUE, ARGV[i]) and 1 or 0
  end
  return out
end

return redis.error_reply('taskthrottle: unknown room operation ' .. tostring(op))
