-- Gives back what an admitted batch consumed, when another part of the same request (keys in
-- another Cluster slot, so another script call) was rejected: the memory store's
-- all-or-nothing, restored in a second round trip that only rejections across slots pay.
--
-- KEYS[i]: operation i's state key. ARGV[1]: now as given to the batch (or 'T');
-- ARGV[2]: the number of operations; then 6 per operation: algorithm, cost, lease id,
-- p1, p2, p3 (as for batch.lua). Returns the number of keys given back to.
-- Each reversal only ever gives back what this request took, never more: a counter that
-- moved to a new window since is left alone.

local now = tonumber(ARGV[1])
if ARGV[1] == 'T' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = tonumber(ARGV[2])
local undone = 0

local function uncount(key, start, field, cost)
  local s = redis.call('HMGET', key, 's', field)
  if tonumber(s[1]) == start and tonumber(s[2]) then
    local left = tonumber(s[2]) - cost
    if left < 0 then left = 0 end
    redis.call('HSET', key, field, string.format('%.0f', left))
    undone = undone + 1
  end
end

for i = 1, n do
  local a = 3 + (i - 1) * 6
  local algo, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local p1, p2, p3 = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local key = KEYS[i]
  if algo == 1 or algo == 3 then
    uncount(key, now - now % p2, 'c', cost)
  elseif algo == 2 then
    uncount(key, p2, 'c', cost)
  elseif algo == 4 then
    local l = tonumber(redis.call('HGET', key, 'l'))
    if l then
      local full = p1 * p3
      l = l + cost * p3
      if l > full then l = full end
      redis.call('HSET', key, 'l', string.format('%.0f', l))
      undone = undone + 1
    end
  elseif algo == 5 then
    local t = tonumber(redis.call('HGET', key, 't'))
    if t then
      t = t - cost * p2
      if t < now then t = now end
      redis.call('HSET', key, 't', string.format('%.0f', t))
      undone = undone + 1
    end
  else
    undone = undone + redis.call('ZREM', key, ARGV[a + 2])
  end
end
return undone
