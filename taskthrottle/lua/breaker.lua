--[[ breaker.lua: one step of a circuit breaker, atomically. Mirrors step of _circuit.py,
whose docstring describes the fields; the contract tests hold the two to one answer.

KEYS[1]     `{ns}:cb:<name>`, a HASH: "s" state (0 closed, 1 open, 2 half-open; no hash:
            closed), "u" open until (ms), "k" successful probes, "q<id>" a probe in
            flight and when it counts as lost (ms), "n" the latest probe id given out
            (kept across states), and per slice j of the window (0..9) "c<j>" calls,
            "f<j>" failures, "i<j>" the slice of time it holds. Expires a window (and an
            open state's time and its probes') plus a minute after its last write.
ARGV[1]     now in ms, or '' to read Redis TIME (tests inject a clock)
ARGV[2]     op: 0 enter, 1 success, 2 failure, 3 ignore (an outcome not to count), 4 peek
ARGV[3]     the round a reported call passed in: 0 closed, else the probe's id
ARGV[4]     the rules, "threshold:rate_per_mille:minimum_calls:window_ms:recovery_ms:
            probes:successes:probe_timeout_ms" (see BreakerSpec in _store.py)

Returns {verdict, wait_ms, state, calls, failures, probes, successes, round, changed,
now_ms}, as BreakerReply in _store.py. A peek writes nothing.
]]

local SLICES, SLACK = 10, 60000
local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local ENTER, SUCCESS, FAILURE, PEEK = 0, 1, 2, 4

local now = clock()
local op, probe_round = num(ARGV[2]), num(ARGV[3])
local threshold, rate, minimum, window, recovery, max_probes, successes_needed, probe_timeout =
  string.match(ARGV[4], '^(%d+):(%d+):(%d+):([1-9]%d*):(%d+):([1-9]%d*):([1-9]%d*):([1-9]%d*)$')
if not probe_timeout then return error('taskthrottle: malformed breaker rules: ' .. ARGV[4]) end
threshold, rate, minimum, window = num(threshold), num(rate), num(minimum), num(window)
recovery, max_probes, successes_needed = num(recovery), num(max_probes), num(successes_needed)
probe_timeout = num(probe_timeout)

local h, dirty, gone, cleared = {}, {}, {}, false
local stored = redis.call('HGETALL', KEYS[1])
for i = 1, #stored, 2 do h[stored[i]] = tonumber(stored[i + 1]) end

local function put(field, value)
  h[field] = value
  dirty[field] = true
end

local function drop(field)
  h[field], dirty[field] = nil, nil
  gone[#gone + 1] = field
end

-- Forget every field but the latest probe id.
local function clear()
  local latest = h['n']
  h, dirty, gone, cleared = {}, {}, {}, true
  if latest then put('n', latest) end
end

local width = math.ceil(window / SLICES)
local function window_counts()
  local current = floor(now / width)
  local calls, failures = 0, 0
  for j = 0, SLICES - 1 do
    local held = h['i' .. j]
    if held and held > current - SLICES then
      calls, failures = calls + (h['c' .. j] or 0), failures + (h['f' .. j] or 0)
    end
  end
  return calls, failures
end

local function count(failed)
  local current = floor(now / width)
  local j = current % SLICES
  if h['i' .. j] ~= current then
    put('i' .. j, current); put('c' .. j, 0); put('f' .. j, 0)
  end
  put('c' .. j, (h['c' .. j] or 0) + 1)
  if failed then put('f' .. j, (h['f' .. j] or 0) + 1) end
end

local function trips(calls, failures)
  if threshold > 0 and failures >= threshold then return true end
  return rate > 0 and calls >= minimum and failures * 1000 >= rate * calls
end

local function open()
  clear()
  put('s', OPEN); put('u', now + recovery)
end

-- The probes in flight whose deadline has not passed (count, earliest deadline); with
-- purge, the fields of the lost ones are dropped.
local function live_probes(purge)
  local count, first, lost = 0, nil, {}
  for field, deadline in pairs(h) do
    if string.sub(field, 1, 1) == 'q' then
      if deadline > now then
        count = count + 1
        if not first or deadline < first then first = deadline end
      elseif purge then
        lost[#lost + 1] = field
      end
    end
  end
  for _, field in ipairs(lost) do drop(field) end
  return count, first, #lost > 0
end

local state, open_until = h['s'] or CLOSED, h['u'] or 0
local changed, wrote = -1, false
if state == OPEN and now >= open_until then
  state = HALF_OPEN
  if op ~= PEEK then
    put('s', HALF_OPEN); put('k', 0)
    changed, wrote = HALF_OPEN, true
  end
end
local probes, first, purged = live_probes(op ~= PEEK)
wrote = wrote or purged
local verdict, probe_id = 1, 0
local mine = 'q' .. probe_round
if op == ENTER or op == PEEK then
  if state == OPEN then
    verdict = 0
  elseif state == HALF_OPEN then
    verdict = probes < max_probes and 2 or 0
    if verdict == 2 and op == ENTER then
      probe_id = max(now, (h['n'] or 0) + 1)
      put('n', probe_id); put('q' .. probe_id, now + probe_timeout)
      probes, wrote = probes + 1, true
      if not first then first = now + probe_timeout end
    end
  end
elseif state == CLOSED and probe_round == 0 and (op == SUCCESS or op == FAILURE) then
  count(op == FAILURE)
  wrote = true
  if op == FAILURE and trips(window_counts()) then
    open()
    state, open_until, changed = OPEN, h['u'], OPEN
  end
elseif state == HALF_OPEN and h[mine] and h[mine] > now then
  drop(mine)
  probes, wrote = probes - 1, true
  if op == SUCCESS then
    put('k', (h['k'] or 0) + 1)
    if h['k'] >= successes_needed then
      clear()
      state, changed = CLOSED, CLOSED
    end
  elseif op == FAILURE then
    open()
    state, open_until, changed = OPEN, h['u'], OPEN
  end
end

if wrote then
  if cleared then
    redis.call('DEL', KEYS[1])
  elseif #gone > 0 then
    redis.call('HDEL', KEYS[1], unpack(gone))
  end
  local set = {}
  for field in pairs(dirty) do set[#set + 1], set[#set + 2] = field, h[field] end
  if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
  local ttl = window + SLACK
  if state ~= CLOSED then
    ttl = max(h['u'] or 0, now) - now + probe_timeout + window + SLACK
  end
  redis.call('PEXPIRE', KEYS[1], expiry_arg(ttl))
end

local calls, failures, successes, wait = 0, 0, 0, 0
if state == CLOSED then
  calls, failures = window_counts()
  probes = 0
elseif state == OPEN then
  wait, probes = open_until - now, 0
else
  successes = h['k'] or 0
  if probes >= max_probes then wait = max(1, first - now) end
end
return {verdict, wait, state, calls, failures, probes, successes, probe_id, changed, now}
