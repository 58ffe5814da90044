-- What a region's Redis holds of global limits, for the exchange: per key, its own window
-- start and count (`s`, `c`: empty when none), the number of other regions' components, then
-- each as region name and "<window start> <count>".
--
-- KEYS: the counter keys (with a Cluster: of one slot).
local out = {}
for i = 1, #KEYS do
  local all = redis.call('HGETALL', KEYS[i])
  local s, c, others = '', '', {}
  for j = 1, #all, 2 do
    local f = all[j]
    if f == 's' then
      s = all[j + 1]
    elseif f == 'c' then
      c = all[j + 1]
    elseif string.sub(f, 1, 2) == 'g:' then
      others[#others + 1] = string.sub(f, 3)
      others[#others + 1] = all[j + 1]
    end
  end
  out[#out + 1] = s
  out[#out + 1] = c
  out[#out + 1] = string.format('%d', #others / 2)
  for _, v in ipairs(others) do out[#out + 1] = v end
end
return out
