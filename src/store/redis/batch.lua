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

local decisions = {}
local writes = {}
local admitted = true

local function window(key, limit, start, stop, cost)
  local s = redis.call('HMGET', key, 's', 'c')
  local count = 0
  if tonumber(s[1]) == start then count = tonumber(s[2]) or 0 end
  local until_end = stop - now
  local total = count + cost
  if total <= limit then
    return {1, limit, limit - total, until_end, -1}, {'HSET', 's', start, 'c', total}, stop
  end
  local retry = -1
  if cost <= limit then retry = until_end end
  return {0, limit, limit - count, until_end, retry}, nil, stop
end

local function sliding(key, limit, w, cost)
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
    return {1, limit, limit - (estimate + cost), stop - now, -1},
      {'HSET', 's', start, 'p', prev, 'c', cur + cost}, stop + w
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
  return {0, limit, remaining, stop - now, retry}, nil, stop + w
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
    return {1, capacity, fdiv(level, period), to_full, -1}, {'HSET', 'l', level, 'u', now}, now + to_full
  end
  local retry = -1
  if need <= full then retry = cdiv(need - level, count) end
  local to_full = cdiv(full - level, count)
  return {0, capacity, fdiv(level, period), to_full, retry}, nil, now + to_full
end

local function gcra(key, capacity, t, cost)
  local tolerance = capacity * t
  local tat = tonumber(redis.call('HGET', key, 't')) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * t
  if new_tat - now <= tolerance then
    local ahead = new_tat - now
    return {1, capacity, fdiv(tolerance - ahead, t), ahead, -1}, {'HSET', 't', new_tat}, new_tat
  end
  local retry = -1
  if cost * t <= tolerance then retry = new_tat - now - tolerance end
  local ahead = tat - now
  local remaining = tolerance - ahead
  if remaining < 0 then remaining = 0 end
  return {0, capacity, fdiv(remaining, t), ahead, retry}, nil, tat
end

local function concurrency(key, max, lease, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  if held < max then
    local expires = now + lease
    local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or now
    if expires > last then last = expires end
    return {1, max, max - held - 1, last - now, -1}, {'ZADD', expires, id}, last
  end
  local first = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) or now
  local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or now
  return {0, max, 0, last - now, first - now}, nil, last
end

for i = 1, n do
  local a = 3 + (i - 1) * 8
  local algo, cost, enforce = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2] == '1'
  local p1, p2, p3 = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local key, ban_key = KEYS[2 * i - 1], KEYS[2 * i]
  local banned_until = tonumber(redis.call('GET', ban_key)) or 0
  local d, w, expires
  if banned_until > now then
    d = {0, p1, 0, banned_until - now, banned_until - now}
    decisions[i] = {d, true}
  else
    if algo == 1 then
      local start = now - now % p2
      d, w, expires = window(key, p1, start, start + p2, cost)
    elseif algo == 2 then
      d, w, expires = window(key, p1, p2, p3, cost)
    elseif algo == 3 then
      d, w, expires = sliding(key, p1, p2, cost)
    elseif algo == 4 then
      d, w, expires = bucket(key, p1, p2, p3, cost)
    elseif algo == 5 then
      d, w, expires = gcra(key, p1, p2, cost)
    else
      d, w, expires = concurrency(key, p1, p2, ARGV[a + 4])
    end
    decisions[i] = {d, false}
    writes[i] = {w, expires}
  end
  if d[1] == 0 and enforce then admitted = false end
end

local out = {admitted and 1 or 0}
for i = 1, n do
  local a = 3 + (i - 1) * 8
  local cost, enforce, ban = tonumber(ARGV[a + 1]), ARGV[a + 2] == '1', tonumber(ARGV[a + 3])
  local d, banned = decisions[i][1], decisions[i][2]
  local key, ban_key = KEYS[2 * i - 1], KEYS[2 * i]
  if not banned then
    local w, expires = writes[i][1], writes[i][2]
    if admitted and d[1] == 1 and w then
      local cmd = {w[1], key}
      for j = 2, #w do
        local v = w[j]
        if type(v) == 'number' then v = int(v) end
        cmd[#cmd + 1] = v
      end
      redis.call(unpack(cmd))
      -- Relative: `now` is the caller's clock, which need not be Redis's.
      redis.call('PEXPIRE', key, int(cdiv(expires - now, 1000) + 1))
    elseif d[1] == 0 and enforce and ban > 0 then
      local until_us = now + ban
      redis.call('SET', ban_key, int(until_us), 'PX', int(cdiv(ban, 1000) + 1))
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
  out[#out + 1] = banned and 1 or 0
end
return out
