--[[ prelude.lua: what every script starts with (after the constants the client shares,
OP_MEMORY_MS and SLOTS_READ): the clock and the op memory.

KEYS[1]     the op: `{ns}:op:a:<lease id>` for an acquire, `{ns}:op:s:<op id>` for a
            settle (two spaces, so that no settle id can pass for a lease id); a STRING,
            the turn (ms) of an op already done, kept until OP_MEMORY_MS past that turn so
            that a call the client sends again changes nothing
KEYS[2..]   the keys entries name by index: `{ns}:b:<key>`, a HASH of buckets and
            windows, two fields each ("b:<name>" = debit_mt and "b@<name>" = anchor_ms for
            a bucket; "q:<name>" = used_mt and "q@<name>" = window index for a fixed
            window or quota) or three ("s:<name>" = count_mt, "s@<name>" = window index and
            "s%<name>" = the previous window's count_mt for a sliding window), and
            "x" = the hash's expiry (ms), which spares a PEXPIRE on almost every call, and
            "p" = until when a pushback holds the key off (ms, see pushback.lua); and
            `{ns}:c:<key>`, a ZSET of concurrency slots, member "<name>:<slots_mt>:<lease
            id>", score = expiry (ms), and per name "#<name>", score = -1 - slots_mt held
            (see entries.lua)
An entry is one ARGV, "i:kind:cap_mt:refill_mt:period_ms:amount_mt:name": KEYS[i] holds
it, the hash for kind 0 (a bucket), 2 (a fixed window or quota) and 3 (a sliding window,
whose refill_mt is its cap_mt), the zset for kind 1 (concurrency).
Amounts may be negative in settle.lua.

Numbers are Lua doubles: every integer here stays below 2^53 (the client checks, and so
do the scripts), so floor(a / b) is exact. State goes to redis.call as numbers, which Redis
writes exactly (tostring and '..' would keep only 14 digits). Expiries are the exception:
Redis formats a number with %.17g, which from 1e17 on is exponent form, and PEXPIRE
refuses that after the writes before it; so each goes through `expiry_arg`.

Scripts read TIME before they write, which Redis allows since it replicates a script's
effects rather than the script (the only way since Redis 7, the default since 5).

Every call runs these definitions and parses its entries, and in Redis' Lua a function
call or a conversion costs more than arithmetic: state is kept as numbers in fields of
their own, never as formatted text. An entry is one ARGV rather than one per number
because the client packs each argument in Python, at about a third of a microsecond each.
]]

-- A hash's expiry is pushed this far past what its state needs, so that a busy key is
-- extended about once a minute rather than on every write.
local EXPIRY_SLACK = 60000
local LIMIT = 9007199254740992
-- The longest expiry (ms) any key or slot is given: 2^52 ms, some 142,000 years, far past
-- what any state needs, and short enough that now plus it is still an exact integer.
local MAX_EXPIRY = 4503599627370496
local floor, max, min = math.floor, math.max, math.min

-- `ms` as PEXPIRE takes it: an integer in [1, MAX_EXPIRY], formatted with '%.0f', since
-- Redis would pass a number of 1e17 or more in exponent form, and refuse it.
local function expiry_arg(ms)
  return string.format('%.0f', min(max(ms, 1), MAX_EXPIRY))
end

local function num(text)
  local value = tonumber(text)
  if value == nil or value ~= value or math.abs(value) >= LIMIT then
    return error('taskthrottle: not a finite number below 2^53: ' .. tostring(text))
  end
  return value
end

local function clock()
  if ARGV[1] ~= '' then return num(ARGV[1]) end
  local t = redis.call('TIME')
  return t[1] * 1000 + floor(t[2] / 1000)
end

local function malformed(entry)
  return error('taskthrottle: malformed entry: ' .. entry)
end

-- The turn an earlier run of this op recorded, or nil. An injected clock in tests can
-- outrun the key's expiry, hence the age check.
local function op_recall(now)
  local turn = tonumber(redis.call('GET', KEYS[1]))
  if turn and turn + OP_MEMORY_MS > now then return turn end
  return nil
end

-- Records this op with its `turn` and returns nil, or returns the turn an earlier run
-- recorded, recording nothing. The record lives until OP_MEMORY_MS past the turn, as long
-- as op_recall honours it: a reservation booked minutes ahead is still known at its turn
-- (the integrations check a deferred task's booking by acquiring again with its lease id).
local function op_claim(turn, now)
  local ttl = expiry_arg(turn - now + OP_MEMORY_MS)
  if redis.call('SET', KEYS[1], turn, 'NX', 'PX', ttl) then return nil end
  local earlier = op_recall(now)
  if earlier then return earlier end
  redis.call('SET', KEYS[1], turn, 'PX', ttl)
  return nil
end

-- The turn an earlier grant of this lease recorded (a client retry), or nil. A request
-- granted now (nothing `refused`) records its own turn, now + delay, with the same call;
-- a refusal records nothing, and may still be the repeat of a grant.
local function op_replay(refused, delay, now)
  if #refused == 0 then return op_claim(now + delay, now) end
  return op_recall(now)
end

-- The reply of a refusal: the delay of the whole request, then the index and wait of each
-- refusing entry.
local function refusal(refused, delay, now)
  local reply = {0, delay, now}
  for _, value in ipairs(refused) do reply[#reply + 1] = value end
  return reply
end

-- What an acquire of buckets alone answers before it writes anything, given the index and
-- wait of each refusing entry and the delay of the whole request: the replay of an
-- earlier grant of this lease (which charged them already), or the refusal; nil when
-- granted now, its turn recorded.
local function answer_before_writing(refused, delay, now)
  local earlier = op_replay(refused, delay, now)
  if earlier then return {2, max(0, earlier - now), now} end
  if #refused == 0 then return nil end
  return refusal(refused, delay, now)
end
