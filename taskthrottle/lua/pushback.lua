--[[ pushback.lua: the callee said "slow down": hold off a key, and lower what its
limits have left to what the callee reported. Keys and entries as in prelude.lua
(after entries.lua).

KEYS[1]      not used (the op: a pushback needs no memory, a repeat holds the same)
KEYS[2]      `{ns}:b:<key>`, the key's hash; its field "p" is when the hold ends (ms),
             which `look` (entries.lua) and buckets.lua add to every bucket's and
             quota's wait
ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2]      hold ms from now (0: none); a hold that ends sooner than one in place
             changes nothing
ARGV[3..]    buckets and quotas of the key as in prelude.lua, each with amount_mt = what
             the callee says is left: one that holds more is charged down to it

Returns the end of the hold in place (ms), 0 when none.
]]

local now = clock()
local hold = num(ARGV[2])
local entries, hashes = read_entries(3)
for _, e in ipairs(entries) do
  local left = e[AMOUNT]
  e[AMOUNT] = 0
  look(e, now)
  e[AMOUNT] = max(0, e[CAP] - left - e[USED])
end
charge(hashes, now)

local held = tonumber(redis.call('HGET', KEYS[2], 'p')) or 0
if hold > 0 and now + hold > held then
  held = now + hold
  redis.call('HSET', KEYS[2], 'p', held)
  if redis.call('PTTL', KEYS[2]) < hold + EXPIRY_SLACK then
    -- "x" must never promise more than the real expiry (see prelude.lua).
    redis.call('HSET', KEYS[2], 'x', now + hold + EXPIRY_SLACK)
    redis.call('PEXPIRE', KEYS[2], expiry_arg(hold + EXPIRY_SLACK))
  end
end
if held <= now then return 0 end
return held
