--[[ deferrals.lua: tasks parked until their turn, and which copy of a task may run.

The parking keys are an app's own: `<p>` is `{ns}:park:<app>`.

KEYS[1]   `<p>:due`      ZSET parked task id -> due ms (Redis time)
KEYS[2]   `<p>:claimed`  ZSET claimed task id -> claim deadline ms
KEYS[3]   `<p>:items`    HASH parked task id -> "due_ms|payload"
KEYS[4]   `{ns}:run:<task id>` STRING (only for begin/expect/park/own): which copy may run:
          "parked", a publish token, "ran:<token>", or "body:<token>" (the delivery with that
          token runs its body where it is, its hand-back having failed); EX the run-key ttl
KEYS[5]   `<p>:epoch` STRING: set while anything was parked; its absence after tasks
          were parked means the parking data was lost (a restart, FLUSHALL, eviction)
KEYS[6]   `<p>:aside`    HASH task id -> payload of parked tasks that could not be
          published (unreadable, or refused by the app's accept_content), kept a week
ARGV[1]   now in ms, or '' to read Redis TIME
ARGV[2]   the operation: park | claim | done | aside | expect | begin | own
ARGV[3..] park:   task id, due in ms, run-key ttl s, payload, most tasks parked at once
          claim:  lead ms, batch size, claim ms
          done:   task id
          aside:  task id
          expect: task id, token, run-key ttl s, prior token: may this copy be published?
                  (prior: the token of the delivery deferring itself, '' for an original
                  delivery, '*' for a releaser's copy of a parked task)
          begin:  task id, token ('' for an original delivery), run-key ttl s, prior token
                  (the token of the delivery that published this copy, '' if none)
          own:    task id, token ('' for an original delivery), run-key ttl s, prior token

Every key expires: the parking keys a day after their last write (parked tasks are due
within the integrations' horizon, minutes), run keys after the run-key ttl.

park    returns 1, or 0 having written nothing when the most tasks are parked already.
claim   returns {epoch (1 if the epoch key exists, else 0), tasks still parked or claimed,
        id, ms until due, payload, ...} for tasks due within the lead, and for claims whose
        holder let the deadline pass (a crashed releaser).
done    returns 1.
aside   returns 1 if the task was parked (it is now set aside), else 0.
expect  returns 1 if the token now owns the run key, 0 if an earlier copy already ran
        (other than the prior one, which is handing itself back).
begin   returns 2 if this delivery took its task over before (`own`): redelivered, it
        runs again only if its broker acknowledges after the body (see OWNED); else
        returns 1 if this delivery may run: its token owns the key (or it ran under
        it before: an acks_late redelivery, or the key is gone), it was published by the
        copy that ran last (while the store could not record it), or it is an original
        whose task was never deferred.
own     returns 1 if the delivery holding the token may run its body where it is after a
        hand-back that failed (which may have parked or published a copy all the same:
        that copy is now stale, and a parked one is dropped), 0 if such a copy started.
]]

local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local now, op = clock(), ARGV[2]
local PARK_TTL_MS = 86400000

-- Gives `key` at least PARK_TTL_MS more to live (a PEXPIRE only when it has less).
local function keep(key)
  if redis.call('PTTL', key) < PARK_TTL_MS - 60000 then redis.call('PEXPIRE', key, PARK_TTL_MS) end
end

if op == 'park' then
  local most = tonumber(ARGV[7])
  if redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= most
    and redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then
    return 0
  end
  local due = now + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[1], string.format('%.0f', due), ARGV[3])
  redis.call('HSET', KEYS[3], ARGV[3], string.format('%.0f', due) .. '|' .. ARGV[6])
  redis.call('SET', KEYS[4], 'parked', 'EX', ARGV[5])
  redis.call('SET', KEYS[5], 1, 'NX', 'PX', PARK_TTL_MS)
  keep(KEYS[1])
  keep(KEYS[3])
  keep(KEYS[5])
  return 1
end

if op == 'claim' then
  local lead, batch, hold = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now), 'LIMIT', 0, batch)
  local ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now + lead),
    'LIMIT', 0, batch - #ids)
  for _, id in ipairs(ready) do ids[#ids + 1] = id end
  local out = {redis.call('EXISTS', KEYS[5]), 0}
  for _, id in ipairs(ids) do
    local item = redis.call('HGET', KEYS[3], id)
    redis.call('ZREM', KEYS[1], id)
    if item then
      redis.call('ZADD', KEYS[2], string.format('%.0f', now + hold), id)
      local sep = string.find(item, '|', 1, true)
      out[#out + 1] = id
      out[#out + 1] = math.max(0, tonumber(string.sub(item, 1, sep - 1)) - now)
      out[#out + 1] = string.sub(item, sep + 1)
    else
      redis.call('ZREM', KEYS[2], id)
    end
  end
  if #out > 2 then keep(KEYS[2]) end
  out[2] = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  return out
end

if op == 'done' then
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
  return 1
end

if op == 'aside' then
  local item = redis.call('HGET', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
  if not item then return 0 end
  redis.call('HSET', KEYS[6], ARGV[3], item)
  redis.call('PEXPIRE', KEYS[6], 7 * PARK_TTL_MS)
  return 1
end

-- What begin answers for a delivery that ran its body where it was (own): a redelivery of
-- it, which runs again under acks_late and is a duplicate of a delivery acknowledged early.
local OWNED = 2

-- Whether a run key names a copy that started ("ran:" or "body:").
local function started(current)
  return current and (string.sub(current, 1, 4) == 'ran:' or string.sub(current, 1, 5) == 'body:')
end

-- Whether `current` is the mark of `prior`, the delivery that handed this copy back.
local function made_by(current, prior)
  return prior ~= '' and (current == prior or current == 'ran:' .. prior or current == 'body:' .. prior)
end

if op == 'expect' then
  local current = redis.call('GET', KEYS[4])
  -- '' names an original delivery (a releaser names '*'): one that ran its body where it
  -- was ("body:") and hands itself back again, after a requeue or a redelivery.
  local original_again = ARGV[6] == '' and current == 'body:'
  if started(current) and not made_by(current, ARGV[6]) and not original_again then
    return 0
  end
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[5])
  return 1
end

if op == 'begin' then
  local current = redis.call('GET', KEYS[4])
  local token, prior = ARGV[4], ARGV[6]
  if token == '' then
    if not current then return 1 end
    return current == 'body:' and OWNED or 0
  end
  if current == 'ran:' .. token then return 1 end
  if current == 'body:' .. token then return OWNED end
  -- No key: nothing competes (it expired, or the store lost it). The prior copy's token:
  -- that copy handed this one back while the store could not record it.
  if not current or current == token
    or (prior ~= '' and (current == prior or current == 'ran:' .. prior)) then
    redis.call('SET', KEYS[4], 'ran:' .. token, 'EX', ARGV[5])
    return 1
  end
  return 0
end

if op == 'own' then
  local current = redis.call('GET', KEYS[4])
  local token = ARGV[4]
  local mine = current == 'ran:' .. token or current == 'body:' .. token
  if started(current) and not mine and not made_by(current, ARGV[6]) then
    return 0
  end
  redis.call('ZREM', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HDEL', KEYS[3], ARGV[3])
  redis.call('SET', KEYS[4], 'body:' .. token, 'EX', ARGV[5])
  return 1
end

return redis.error_reply('taskthrottle: unknown deferrals operation ' .. tostring(op))
