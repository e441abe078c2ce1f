--[[ peek.lua: what each entry could take now; writes nothing.

Keys as in common.lua (the op hashes are not used).
ARGV[1]      now in ms, or '' to read Redis TIME
ARGV[2..]    one entry each, as in common.lua (amount ignored)

Returns one integer per entry: available millitokens (or slots), negative in debt.
]]

local now = clock()
local entries = read_entries(2)
local out = {}
for i, e in ipairs(entries) do
  e.amount = 0
  look(e, now)
  out[i] = e.cap - e.used
end
return out
