--[[ peek.lua: what each entry could take now; writes nothing.

KEYS as in prelude.lua (KEYS[1], the op, is not used).
ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2..]    the entries, as in prelude.lua (amounts ignored)

Returns one integer per entry: available millitokens (or slots), negative in debt.
]]

local now = clock()
local entries = read_entries(2)
local out = {}
for i, e in ipairs(entries) do
  e[AMOUNT] = 0
  look(e, now)
  out[i] = e[CAP] - e[USED]
end
return out
