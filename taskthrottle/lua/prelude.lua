--[[ prelude.lua: what every script starts with (after the constant the client shares,
OP_MEMORY_MS): the clock and the op memory.

KEYS[1]     `{ns}:op:<op id>`: STRING, the turn (ms) of an op already done, kept for
            OP_MEMORY_MS so that a call the client sends again changes nothing
KEYS[2..]   the keys entries name by index: `{ns}:b:<key>`, a HASH of buckets and
            quotas, two fields each ("b:<name>" = debit_mt and "b@<name>" = anchor_ms for a
            bucket; "q:<name>" = used_mt and "q@<name>" = window index for a quota), and
            "x" = the hash's expiry (ms), which spares a PEXPIRE on almost every call; and
            `{ns}:c:<key>`, a ZSET of concurrency slots, member "<name>:<slots_mt>:<lease
            id>", score = expiry (ms), and per name "#<name>", score = -1 - slots_mt held
            (see entries.lua)
An entry is one ARGV, "i:kind:cap_mt:refill_mt:period_ms:amount_mt:name": KEYS[i] holds
it, the hash for kind 0 (a bucket) and 2 (a quota), the zset for kind 1 (concurrency).
Amounts may be negative in settle.lua.

Numbers are Lua doubles: every integer here stays below 2^53 (the client checks, and so
do the scripts), so floor(a / b) is exact. State goes to redis.call as numbers, which Redis
writes exactly (tostring and '..' would keep only 14 digits).

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
local floor, max = math.floor, math.max

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
-- recorded, recording nothing.
local function op_claim(turn, now)
  if redis.call('SET', KEYS[1], turn, 'NX', 'PX', OP_MEMORY_MS) then return nil end
  local earlier = op_recall(now)
  if earlier then return earlier end
  redis.call('SET', KEYS[1], turn, 'PX', OP_MEMORY_MS)
  return nil
end

-- What an acquire answers before it writes anything, given the index and wait of each
-- refusing entry and the delay of the whole request: the replay of an earlier grant of
-- this lease (a client retry), or the refusal; nil when granted now, its turn recorded.
-- Only a grant records the lease: a refusal may still be the repeat of a grant.
local function answer_before_writing(refused, delay, now)
  local earlier
  if #refused == 0 then
    earlier = op_claim(now + delay, now)
  else
    earlier = op_recall(now)
  end
  if earlier then return {1, max(0, earlier - now), now} end
  if #refused == 0 then return nil end
  local reply = {0, delay, now}
  for _, value in ipairs(refused) do reply[#reply + 1] = value end
  return reply
end
