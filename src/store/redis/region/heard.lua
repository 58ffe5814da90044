-- When each other region last wrote into this Redis, on this Redis's clock (µs), so that no
-- two machines' clocks are compared. With ARGV[1]: the region writing now says so. Returns
-- this Redis's time, then region, time pairs.
--
-- KEYS[1]: the hash of regions heard from.
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
if ARGV[1] then redis.call('HSET', KEYS[1], ARGV[1], now) end
local out = {now}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all do out[#out + 1] = all[j] end
return out
