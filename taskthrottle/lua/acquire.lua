--[[ acquire.lua: charge every entry of a lease, or none. Keys and entries as in
prelude.lua; the op is the lease.

ARGV[1]      now in ms, or '' to read Redis TIME (tests inject a clock)
ARGV[2]      max wait ms: a bucket or window may be charged into debt if its turn comes
             within it (a window's turn is the start of a later window)
ARGV[3]      slot ttl ms, counted from the turn; also the wait a refusal answers when the
             SLOTS_READ soonest slots to expire free too little (see slots_wait)
ARGV[4]      lease id, the member of its slots
ARGV[5..]    the entries, as in prelude.lua

Returns {1, delay_ms, now_ms} when granted (now_ms alone, an integer, when granted with
no delay: Redis sends a table at a cost of microseconds), or {0, wait_ms, now_ms, i1,
wait1, ...} (1-based entry index and own wait of each refusing entry) having written
nothing but the pruning of expired slots (see `look`), which no answer can tell. Once
granted, the lease's turn is recorded, and a repeated call (a client retry) replays the
grant, answering {2, delay_ms, now_ms}: it charges nothing, and holds the lease's slots
again (see `replay`). A lease's own slots never count against it.
]]

-- The repeat of a grant made at `earlier` (a client retry, or the lease acquiring again
-- before OP_MEMORY_MS past its turn), given each entry's wait. Its buckets and windows were charged then
-- and are not again. Its slots are held again from its turn: those it still holds only
-- move their expiry; those freed meanwhile (released, or expired) are taken again when
-- they fit now, else the repeat is refused, writing nothing: the cap is never exceeded.
local function replay(entries, waits, earlier, now, ttl, lease)
  local delay, refused, worst = max(0, earlier - now), {}, 0
  for i, e in ipairs(entries) do
    if e[KIND] == 1 and waits[i] > 0 then
      refused[#refused + 1], refused[#refused + 2] = i, waits[i]
      worst = max(worst, waits[i])
    end
  end
  if #refused > 0 then return refusal(refused, worst, now) end
  hold_slots(entries, now, delay + ttl, lease)
  return {2, delay, now}
end

local now = clock()
local max_wait, ttl, lease = num(ARGV[2]), num(ARGV[3]), ARGV[4]
local entries, hashes = read_entries(5)

local waits, refused, delay = {}, {}, 0
for i, e in ipairs(entries) do
  local wait = look(e, now, lease, ttl)
  waits[i], delay = wait, max(delay, wait)
  if wait > (e[KIND] ~= 1 and max_wait or 0) then
    refused[#refused + 1], refused[#refused + 2] = i, wait
  end
end

local earlier = op_replay(refused, delay, now)
if earlier then return replay(entries, waits, earlier, now, ttl, lease) end
if #refused > 0 then return refusal(refused, delay, now) end

hold_slots(entries, now, delay + ttl, lease)
charge(hashes, now)
if delay == 0 then return now end
return {1, delay, now}
