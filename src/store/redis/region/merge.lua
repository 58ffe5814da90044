-- A region's counts of global limits, written into another region's Redis: each region is one
-- component of a per-key grow-only counter (`g:<region>` = "<window start> <count>"), merged
-- by keeping the later window, and in one window the larger count — so a push sent twice, late
-- or out of order changes nothing. Then `o` (the sum of the components of the latest window
-- among them) and `ow` (that window's start), which batch.lua adds to the region's own count.
--
-- KEYS: the counter keys (with a Cluster: of one slot). ARGV[1]: the sending region; then per
-- key: window start (µs), count, how long the key must live at least (ms).
local field = 'g:' .. ARGV[1]
local function int(x) return string.format('%d', x) end
local function component(text)
  if not text then return -1, -1 end
  local s, c = string.match(text, '^(%d+) (%d+)$')
  return tonumber(s) or -1, tonumber(c) or -1
end
for i = 1, #KEYS do
  local key = KEYS[i]
  local start, count, life =
    tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
  local os, oc = component(redis.call('HGET', key, field))
  if start > os or (start == os and count > oc) then
    redis.call('HSET', key, field, int(start) .. ' ' .. int(count))
    local all = redis.call('HGETALL', key)
    local top, sum = -1, 0
    for j = 1, #all, 2 do
      if string.sub(all[j], 1, 2) == 'g:' then
        local s, c = component(all[j + 1])
        if s > top then
          top, sum = s, c
        elseif s == top then
          sum = sum + c
        end
      end
    end
    redis.call('HSET', key, 'o', int(sum), 'ow', int(top))
    if redis.call('PTTL', key) < life then redis.call('PEXPIRE', key, int(life)) end
  end
end
return #KEYS
