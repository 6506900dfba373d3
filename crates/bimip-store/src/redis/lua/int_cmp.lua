-- Compares two integers given as canonical decimal strings (as Rust formats them): -1, 0 or 1.
-- Exact for all of u64 and i64, where Lua's doubles are not. Prepended to the scripts that use it.
local function int_cmp(a, b)
  local na, nb = a:sub(1, 1) == '-', b:sub(1, 1) == '-'
  if na ~= nb then
    if na then return -1 end
    return 1
  end
  local r
  if a == b then
    return 0
  elseif #a ~= #b then
    if #a < #b then r = -1 else r = 1 end
  else
    if a < b then r = -1 else r = 1 end
  end
  if na then return -r end
  return r
end
