--[[ acquire.lua: charge every entry of a lease, or none. Keys as in common.lua.

ARGV[1]      now in ms, or '' to read Redis TIME (tests inject a clock)
ARGV[2]      max wait ms: a bucket may be charged into debt if its turn comes within it
ARGV[3]      slot ttl ms, counted from the turn
ARGV[4]      lease id; once granted it is remembered (with "now:delay") for ARGV[5] ms
             or more, and a repeated call (a client retry) replays the grant, charging nothing
ARGV[6..]    one entry each, as in common.lua

Returns {1, delay_ms, now_ms} when granted, or {0, wait_ms, now_ms, i1, wait1, ...}
(1-based entry index and own wait of each refusing entry) having written nothing.
]]

local now = clock()
local max_wait, ttl, lease, memory = num(ARGV[2]), num(ARGV[3]), ARGV[4], num(ARGV[5])
local seen, stale = op_recall(lease, now, memory)
if seen then
  local at, delay = pair(seen)
  return {1, math.max(0, at + delay - now), now}
end
local entries = read_entries(6)

local states, refused, delay = {}, {}, 0
for i, e in ipairs(entries) do
  local wait, state = look(e, now)
  states[i] = state
  delay = math.max(delay, wait)
  local allowed = 0
  if e.kind == 0 then allowed = max_wait end
  if wait > allowed then
    refused[#refused + 1] = i
    refused[#refused + 1] = wait
  end
end
if #refused > 0 then
  local reply = {0, delay, now}
  for _, value in ipairs(refused) do reply[#reply + 1] = value end
  return reply
end

local writes = {}
for i, e in ipairs(entries) do
  if e.kind == 1 then
    redis.call('ZADD', e.zkey, fmt(now + delay + ttl), slot_member(e, lease))
    redis.call('ZREMRANGEBYSCORE', e.zkey, '-inf', fmt(now))
    keep(e.zkey, delay + ttl)
  else
    charge(e, states[i], now, e.amount, writes)
  end
end
flush(writes)
op_remember(lease, fmt2(now, delay), now, memory, stale)
return {1, delay, now}
