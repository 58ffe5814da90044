-- One request's operations, decided together and consumed all-or-nothing: the same
-- arithmetic as src/limiter/*.rs, in integers (microseconds, counts) that a Lua number
-- (a double) holds exactly below 2^53; the compiler keeps every product below that.
--
-- KEYS[2i-1]: operation i's state key; KEYS[2i]: its ban key (same hash tag).
-- ARGV[1]: now (µs since the epoch), or 'T' to read Redis's own clock (TIME), for nodes that
-- must share one clock; ARGV[2]: the number of operations; then 8 per
-- operation: algorithm, cost, enforce (0/1), ban (µs, 0 = none), lease id, p1, p2, p3.
-- Algorithms: 1 fixed window (p1 limit, p2 window), 2 calendar (p1 limit, p2 start, p3 end),
-- 3 sliding window (p1 limit, p2 window), 4 token bucket (p1 capacity, p2 count, p3 period),
-- 5 GCRA (p1 capacity, p2 emission interval), 6 concurrency (p1 max, p2 lease).
-- Returns: admitted (0/1), then 6 per operation: allowed, limit, remaining, reset (µs),
-- retry after (µs, -1 = never), banned (0/1).
--
-- Cost on Redis's side matters (it is single-threaded and shared by every node): every number
-- handed to redis.call is formatted to text, which costs about as much as a command, so the
-- common paths avoid it. A count in the same window is an HINCRBY by the cost as it arrived
-- (ARGV text), with no new expiry; a bucket or GCRA key's expiry is only pushed out when it
-- would end too soon (a longer life is harmless: a full bucket or a past TAT is the same as
-- no key); a limit without a ban never reads its ban key.

local now = tonumber(ARGV[1])
if ARGV[1] == 'T' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local n = tonumber(ARGV[2])

local function fdiv(a, b) return (a - a % b) / b end
-- Numbers handed to Redis as text: Lua's default "%.14g" would round timestamps.
local function int(x) return string.format('%.0f', x) end
local function cdiv(a, b) return fdiv(a + b - 1, b) end

-- Keeps `key` at least `need` µs from now, extending it to `life` µs when it would end
-- sooner.
local function keep(key, need, life)
  if redis.call('PTTL', key) * 1000 < need then
    redis.call('PEXPIRE', key, int(cdiv(life, 1000) + 1))
  end
end

local decisions = {}
local banned = {}
local writes = {}
local costs = {}
local enforced = {}
local admitted = true

local function window(key, limit, start, stop, cost, cost_text)
  local s = redis.call('HMGET', key, 's', 'c')
  local count = 0
  local same = tonumber(s[1]) == start
  if same then count = tonumber(s[2]) or 0 end
  local until_end = stop - now
  local total = count + cost
  if total <= limit then
    local write
    if same then
      write = function() redis.call('HINCRBY', key, 'c', cost_text) end
    else
      write = function()
        redis.call('HSET', key, 's', int(start), 'c', cost_text)
        redis.call('PEXPIRE', key, int(cdiv(stop - now, 1000) + 1))
      end
    end
    return {1, limit, limit - total, until_end, -1}, write
  end
  local retry = -1
  if cost <= limit then retry = until_end end
  return {0, limit, limit - count, until_end, retry}, nil
end

local function sliding(key, limit, w, cost, cost_text)
  local start = now - now % w
  local stop = start + w
  local s = redis.call('HMGET', key, 's', 'p', 'c')
  local sstart = tonumber(s[1])
  local prev, cur = 0, 0
  if sstart == start then
    prev, cur = tonumber(s[2]) or 0, tonumber(s[3]) or 0
  elseif sstart ~= nil and sstart + w == start then
    prev = tonumber(s[3]) or 0
  end
  local elapsed = now - start
  local estimate = cdiv(prev * (w - elapsed), w) + cur
  if estimate + cost <= limit then
    local write
    if sstart == start then
      write = function() redis.call('HINCRBY', key, 'c', cost_text) end
    else
      write = function()
        redis.call('HSET', key, 's', int(start), 'p', int(prev), 'c', cost_text)
        redis.call('PEXPIRE', key, int(cdiv(stop + w - now, 1000) + 1))
      end
    end
    return {1, limit, limit - (estimate + cost), stop - now, -1}, write
  end
  local function earliest(room, count)
    if count == 0 then return 0 end
    local keep = fdiv(room * w, count)
    if keep >= w then return 0 end
    return w - keep
  end
  local retry = -1
  local room = limit - cost - cur
  if limit - cost >= 0 and room >= 0 then
    local at = start + earliest(room, prev)
    if at < start + w then
      if at < now then at = now end
      retry = at - now
    end
  end
  if retry < 0 and limit - cost >= 0 then
    retry = start + w + earliest(limit - cost, cur) - now
  end
  local remaining = limit - estimate
  if remaining < 0 then remaining = 0 end
  return {0, limit, remaining, stop - now, retry}, nil
end

local function bucket(key, capacity, count, period, cost)
  local full = capacity * period
  local s = redis.call('HMGET', key, 'l', 'u')
  local level = full
  if s[1] then
    level = tonumber(s[1])
    local elapsed = now - tonumber(s[2])
    if elapsed < 0 then elapsed = 0 end
    -- Refill without overflowing: past the time to fill, the bucket is full.
    if elapsed >= cdiv(full - level, count) then
      level = full
    else
      level = level + elapsed * count
    end
  end
  local need = cost * period
  if level >= need then
    level = level - need
    local to_full = cdiv(full - level, count)
    local write = function()
      redis.call('HSET', key, 'l', int(level), 'u', int(now))
      keep(key, to_full, 2 * cdiv(full, count))
    end
    return {1, capacity, fdiv(level, period), to_full, -1}, write
  end
  local retry = -1
  if need <= full then retry = cdiv(need - level, count) end
  local to_full = cdiv(full - level, count)
  return {0, capacity, fdiv(level, period), to_full, retry}, nil
end

local function gcra(key, capacity, t, cost)
  local tolerance = capacity * t
  local tat = tonumber(redis.call('HGET', key, 't')) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * t
  if new_tat - now <= tolerance then
    local ahead = new_tat - now
    local write = function()
      redis.call('HSET', key, 't', int(new_tat))
      keep(key, ahead, 2 * tolerance)
    end
    return {1, capacity, fdiv(tolerance - ahead, t), ahead, -1}, write
  end
  local retry = -1
  if cost * t <= tolerance then retry = new_tat - now - tolerance end
  local ahead = tat - now
  local remaining = tolerance - ahead
  if remaining < 0 then remaining = 0 end
  return {0, capacity, fdiv(remaining, t), ahead, retry}, nil
end

local function concurrency(key, max, lease, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  if held < max then
    local expires = now + lease
    local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or now
    if expires > last then last = expires end
    local write = function()
      redis.call('ZADD', key, int(expires), id)
      redis.call('PEXPIRE', key, int(cdiv(last - now, 1000) + 1))
    end
    return {1, max, max - held - 1, last - now, -1}, write
  end
  local first = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) or now
  local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or now
  return {0, max, 0, last - now, first - now}, nil
end

for i = 1, n do
  local a = 3 + (i - 1) * 8
  local algo, cost_text, enforce = ARGV[a], ARGV[a + 1], ARGV[a + 2] == '1'
  local cost = tonumber(cost_text)
  costs[i], enforced[i] = cost, enforce
  local p1, p2, p3 = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local key = KEYS[2 * i - 1]
  local banned_until = 0
  if ARGV[a + 3] ~= '0' then banned_until = tonumber(redis.call('GET', KEYS[2 * i])) or 0 end
  local d, w
  if banned_until > now then
    d = {0, p1, 0, banned_until - now, banned_until - now}
    banned[i] = true
  else
    if algo == '1' then
      local start = now - now % p2
      d, w = window(key, p1, start, start + p2, cost, cost_text)
    elseif algo == '2' then
      d, w = window(key, p1, p2, p3, cost, cost_text)
    elseif algo == '3' then
      d, w = sliding(key, p1, p2, cost, cost_text)
    elseif algo == '4' then
      d, w = bucket(key, p1, p2, p3, cost)
    elseif algo == '5' then
      d, w = gcra(key, p1, p2, cost)
    else
      d, w = concurrency(key, p1, p2, ARGV[a + 4])
    end
    banned[i] = false
    writes[i] = w
  end
  decisions[i] = d
  if d[1] == 0 and enforce then admitted = false end
end

local out = {admitted and 1 or 0}
for i = 1, n do
  local d, cost = decisions[i], costs[i]
  if not banned[i] then
    if admitted and d[1] == 1 and writes[i] then
      writes[i]()
    elseif d[1] == 0 and enforced[i] and ARGV[6 + (i - 1) * 8] ~= '0' then
      local ban = tonumber(ARGV[6 + (i - 1) * 8])
      local until_us = now + ban
      redis.call('SET', KEYS[2 * i], int(until_us), 'PX', int(cdiv(ban, 1000) + 1))
    end
    if not admitted and d[1] == 1 then
      -- Nothing was consumed: what is left is what was left before.
      local r = d[3] + cost
      if r > d[2] then r = d[2] end
      d[3] = r
    end
  end
  out[#out + 1] = d[1]
  out[#out + 1] = d[2]
  out[#out + 1] = d[3]
  out[#out + 1] = d[4]
  out[#out + 1] = d[5]
  out[#out + 1] = banned[i] and 1 or 0
end
return out
