--[[ acquire.lua: charge every entry of a lease, or none. Keys and entries as in
prelude.lua; the op is the lease.

ARGV[1]      now in ms, or '' to read Redis TIME (tests inject a clock)
ARGV[2]      max wait ms: a bucket may be charged into debt if its turn comes within it
ARGV[3]      slot ttl ms, counted from the turn
ARGV[4]      lease id, the member of its slots
ARGV[5..]    the entries, as in prelude.lua

Returns {1, delay_ms, now_ms} when granted (now_ms alone, an integer, when granted with
no delay: Redis sends a table at a cost of microseconds), or {0, wait_ms, now_ms, i1,
wait1, ...} (1-based entry index and own wait of each refusing entry) having written
nothing. Once granted, the lease's turn is recorded, and a repeated call (a client
retry) replays the grant, charging nothing.
]]

local now = clock()
local max_wait, ttl, lease = num(ARGV[2]), num(ARGV[3]), ARGV[4]
local entries, hashes = read_entries(5)

local refused, delay = {}, 0
for i, e in ipairs(entries) do
  local wait = look(e, now)
  delay = max(delay, wait)
  if wait > (e[KIND] == 0 and max_wait or 0) then
    refused[#refused + 1] = i
    refused[#refused + 1] = wait
  end
end

local early = answer_before_writing(refused, delay, now)
if early then return early end

for _, e in ipairs(entries) do
  if e[KIND] == 1 then
    local held = delay + ttl
    if e[VALUE] > 0 then slots_prune(e[KEY], now) end  -- `look` read the expired ones
    -- What `look` found held is what the prune left. A lease acquiring again (its op
    -- forgotten) only moves its expiry: it is counted already.
    local added = redis.call('ZADD', e[KEY], now + held, slot_member(e, lease))
    redis.call('ZADD', e[KEY], -1 - (e[USED] + added * e[AMOUNT]), '#' .. e[NAME])
    if redis.call('PTTL', e[KEY]) < held then redis.call('PEXPIRE', e[KEY], held) end
  end
end
charge(hashes, now)
if delay == 0 then return now end
return {1, delay, now}
