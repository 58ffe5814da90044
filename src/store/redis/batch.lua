-- Requests, each its own list of operations, decided in the order given: each request's
-- operations are decided together and consumed all-or-nothing, and the next request sees what
-- the previous ones consumed — exactly as if each had been its own call. The arithmetic is
-- src/limiter/*.rs's, in integers (microseconds, counts) that a Lua number (a double) holds
-- exactly below 2^53; the compiler keeps every product below that.
--
-- KEYS: per request, per operation, its state key, then its ban key (same hash tag) if it bans.
-- ARGV[1]: the numbers, packed as little-endian doubles (exact for these whole numbers below
-- 2^53) and read with `struct.unpack`: Lua's `tonumber` is C's `strtod`, which cost more than
-- the rest of a small operation. First the clock (1: read Redis's own with TIME, for nodes
-- that must share one; 0: each request's own) and the number of requests; then per request
-- its now (µs since the epoch) and number of operations, then six per operation: code
-- (algorithm + 10 if enforced + 20 if it bans), cost, ban (µs), and the algorithm's
-- parameters: 1 fixed window (limit, window), 2 calendar (limit, start, end), 3 sliding window
-- (limit, window), 4 token bucket (capacity, count, period), 5 GCRA (capacity, emission
-- interval), 6 concurrency (max, lease); unused ones are 0.
-- ARGV[2…]: per request, each operation's cost as text (written as it is, never formatted
-- here), then the lease id of each of its concurrency operations, in order.
-- Returns, per request: the length of its answer, then the answer: admitted (0/1), then 6 per
-- operation: allowed, limit, remaining, reset (µs), retry after (µs, -1 = never), banned (0/1);
-- or, when every operation was allowed (the common case), 1 and then only remaining and reset
-- per operation: the caller knows the rest, and parsing the reply is most of what a call
-- costs the caller.
--
-- Cost on Redis's side matters (it is single-threaded and shared by every node): every number
-- handed to redis.call is formatted to text, which costs about as much as a command, so the
-- common paths avoid it. A count in the same window is an HINCRBY by the cost as it arrived
-- (ARGV text), with no new expiry; a bucket or GCRA key's expiry is only pushed out when it
-- would end before the bucket is full again (the TAT is past), and then to an eighth past
-- that moment, so that steady traffic re-expires a key at most every eighth of its refill
-- time and an idle key lives at most 1/8 longer than its state matters (a full bucket or a
-- past TAT is the same as no key); a limit without a ban never reads its ban key. The
-- algorithms return their decision and the write to make as plain values (no table or closure
-- per operation), kept in two flat arrays until every operation of the request is decided.

local pos = 1
local clock, requests
clock, requests, pos = struct.unpack('<dd', ARGV[1], pos)
if clock == 1 then
  local t = redis.call('TIME')
  clock = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  clock = nil
end
-- The request being decided's time, read by the algorithms.
local now = 0

local function fdiv(a, b) return (a - a % b) / b end
-- Numbers handed to Redis as text: Lua's default "%.14g" would round timestamps. Every number
-- here is a whole one below 2^53, which '%d' (a C long) writes exactly, and at a third of the
-- cost of '%.0f' (a double's digits).
local function int(x) return string.format('%d', x) end
local function cdiv(a, b) return fdiv(a + b - 1, b) end

-- Each algorithm returns: allowed (0/1), limit, remaining, reset, retry after (-1 = never),
-- then the write to make if the batch is admitted: kind and up to three numbers.
-- Kinds: 0 none; 1 count in the same window (HINCRBY); 2 a new window (start, end);
-- 3 a new sliding window (start, previous count, expiry); 4 a bucket (level, µs to full,
-- life); 5 a GCRA TAT (tat, µs ahead, life); 6 a lease (expiry, the last lease's expiry).

local function window(key, limit, start, stop, cost)
  local s = redis.call('HMGET', key, 's', 'c')
  local count = 0
  local same = tonumber(s[1]) == start
  if same then count = tonumber(s[2]) or 0 end
  local total = count + cost
  if total <= limit then
    if same then return 1, limit, limit - total, stop - now, -1, 1, 0, 0, 0 end
    return 1, limit, limit - total, stop - now, -1, 2, start, stop, 0
  end
  local retry = -1
  if cost <= limit then retry = stop - now end
  return 0, limit, limit - count, stop - now, retry, 0, 0, 0, 0
end

-- When the estimate, with `count` weighted by what is left of its window, leaves `room`.
local function earliest(w, room, count)
  if count == 0 then return 0 end
  local keep = fdiv(room * w, count)
  if keep >= w then return 0 end
  return w - keep
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
  local estimate = cdiv(prev * (stop - now), w) + cur
  if estimate + cost <= limit then
    -- Whole again once this window's count has slid out too.
    if sstart == start then
      return 1, limit, limit - (estimate + cost), stop + w - now, -1, 1, 0, 0, 0
    end
    return 1, limit, limit - (estimate + cost), stop + w - now, -1, 3, start, prev, stop + w
  end
  local retry = -1
  local room = limit - cost - cur
  if limit - cost >= 0 and room >= 0 then
    local at = start + earliest(w, room, prev)
    if at < stop then
      if at < now then at = now end
      retry = at - now
    end
  end
  if retry < 0 and limit - cost >= 0 then
    retry = stop + earliest(w, limit - cost, cur) - now
  end
  local remaining = limit - estimate
  if remaining < 0 then remaining = 0 end
  local whole = stop - now
  if cur > 0 then whole = stop + w - now end
  return 0, limit, remaining, whole, retry, 0, 0, 0, 0
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
    return 1, capacity, fdiv(level, period), to_full, -1, 4, level, to_full, to_full + fdiv(to_full, 8)
  end
  local retry = -1
  if need <= full then retry = cdiv(need - level, count) end
  return 0, capacity, fdiv(level, period), cdiv(full - level, count), retry, 0, 0, 0, 0
end

local function gcra(key, capacity, t, cost)
  local tolerance = capacity * t
  local tat = tonumber(redis.call('HGET', key, 't')) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * t
  if new_tat - now <= tolerance then
    local ahead = new_tat - now
    return 1, capacity, fdiv(tolerance - ahead, t), ahead, -1, 5, new_tat, ahead, ahead + fdiv(ahead, 8)
  end
  local retry = -1
  if cost * t <= tolerance then retry = new_tat - now - tolerance end
  local remaining = tolerance - (tat - now)
  if remaining < 0 then remaining = 0 end
  return 0, capacity, fdiv(remaining, t), tat - now, retry, 0, 0, 0, 0
end

local function concurrency(key, max, lease)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local held = redis.call('ZCARD', key)
  local last = tonumber(redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')[2]) or now
  if held < max then
    local expires = now + lease
    if expires > last then last = expires end
    return 1, max, max - held - 1, last - now, -1, 6, expires, last, 0
  end
  local first = tonumber(redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]) or now
  return 0, max, 0, last - now, first - now, 0, 0, 0, 0
end

-- Keeps `key` at least `need` µs from now, extending it to `life` µs when it would end
-- sooner.
local function keep(key, need, life)
  if redis.call('PTTL', key) * 1000 < need then
    redis.call('PEXPIRE', key, int(cdiv(life, 1000) + 1))
  end
end

-- Per operation of the request being decided: where its state key and ban key (0: none) are
-- in KEYS, its cost, where its cost and lease id are in ARGV, its ban, and whether it is
-- enforced; and the write to make. Reused from request to request.
local at = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local writes = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
-- Every request's answer, one after the other; built at its size for one request of up to
-- four operations (growing a Lua table step by step costs more than a small request). The
-- reply ends at the first nil, which is written after the last answer.
local out = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local top = 0
local k, a = 1, 2

for _ = 1, requests do
  local n
  now, n, pos = struct.unpack('<dd', ARGV[1], pos)
  if clock then now = clock end
  -- This request's answer: its length at `top + 1`, admitted at `base`, then its operations.
  local base = top + 2
  local admitted = true
  local lease_at = a + n
  for i = 1, n do
    local code, cost, ban, p1, p2, p3
    code, cost, ban, p1, p2, p3, pos = struct.unpack('<dddddd', ARGV[1], pos)
    local algo, enforce, bans = code % 10, code % 20 >= 10, code >= 20
    local key_at, ban_key, lease = k, 0, 0
    local key = KEYS[k]
    k = k + 1
    if bans then
      ban_key = k
      k = k + 1
    end
    if algo == 6 then
      lease = lease_at
      lease_at = lease_at + 1
    end
    local c = (i - 1) * 7
    at[c + 1], at[c + 2], at[c + 3], at[c + 4], at[c + 5], at[c + 6], at[c + 7] =
      key_at, ban_key, cost, lease, ban, enforce, a + i - 1
    local banned_until = 0
    if bans then banned_until = tonumber(redis.call('GET', KEYS[ban_key])) or 0 end
    local ok, limit, remaining, reset, retry, kind, wa, wb, wc
    local banned = 0
    if banned_until > now then
      ok, limit, remaining, reset, retry = 0, p1, 0, banned_until - now, banned_until - now
      kind, wa, wb, wc = 0, 0, 0, 0
      banned = 1
    elseif algo == 1 then
      local start = now - now % p2
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = window(key, p1, start, start + p2, cost)
    elseif algo == 2 then
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = window(key, p1, p2, p3, cost)
    elseif algo == 3 then
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = sliding(key, p1, p2, cost)
    elseif algo == 4 then
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = bucket(key, p1, p2, p3, cost)
    elseif algo == 5 then
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = gcra(key, p1, p2, cost)
    else
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = concurrency(key, p1, p2)
    end
    local b = base + (i - 1) * 6
    out[b + 1], out[b + 2], out[b + 3], out[b + 4], out[b + 5], out[b + 6] =
      ok, limit, remaining, reset, retry, banned
    local w = (i - 1) * 4
    writes[w + 1], writes[w + 2], writes[w + 3], writes[w + 4] = kind, wa, wb, wc
    if ok == 0 and enforce then admitted = false end
  end
  a = lease_at

  if admitted then out[base] = 1 else out[base] = 0 end
  local short = admitted
  for i = 1, n do
    local b = base + (i - 1) * 6
    local c = (i - 1) * 7
    local w = (i - 1) * 4
    local key = KEYS[at[c + 1]]
    local cost = ARGV[at[c + 7]]
    local ok = out[b + 1]
    if out[b + 6] == 1 then
      -- Banned: nothing to write.
      short = false
    elseif admitted and ok == 1 then
      local kind, wa, wb, wc = writes[w + 1], writes[w + 2], writes[w + 3], writes[w + 4]
      if kind == 1 then
        redis.call('HINCRBY', key, 'c', cost)
      elseif kind == 2 then
        redis.call('HSET', key, 's', int(wa), 'c', cost)
        redis.call('PEXPIRE', key, int(cdiv(wb - now, 1000) + 1))
      elseif kind == 3 then
        redis.call('HSET', key, 's', int(wa), 'p', int(wb), 'c', cost)
        redis.call('PEXPIRE', key, int(cdiv(wc - now, 1000) + 1))
      elseif kind == 4 then
        redis.call('HSET', key, 'l', int(wa), 'u', int(now))
        keep(key, wb, wc)
      elseif kind == 5 then
        redis.call('HSET', key, 't', int(wa))
        keep(key, wb, wc)
      elseif kind == 6 then
        redis.call('ZADD', key, int(wa), ARGV[at[c + 4]])
        redis.call('PEXPIRE', key, int(cdiv(wb - now, 1000) + 1))
      end
    else
      short = false
      if ok == 0 and at[c + 6] and at[c + 2] ~= 0 then
        local ban = at[c + 5]
        redis.call('SET', KEYS[at[c + 2]], int(now + ban), 'PX', int(cdiv(ban, 1000) + 1))
        -- The rejection that starts a ban announces it.
        if out[b + 4] < ban then out[b + 4] = ban end
        if out[b + 5] < ban then out[b + 5] = ban end
        out[b + 6] = 1
      end
      if ok == 1 then
        -- Nothing was consumed: what is left is what was left before.
        local r = out[b + 3] + at[c + 3]
        if r > out[b + 2] then r = out[b + 2] end
        out[b + 3] = r
      end
    end
  end
  local length = 1 + 6 * n
  if short then
    -- Every operation allowed and consumed: remaining and reset each, moved down in place
    -- (each pair lands at or below where it was read).
    for i = 1, n do
      local b = base + (i - 1) * 6
      out[base + 2 * i - 1], out[base + 2 * i] = out[b + 3], out[b + 4]
    end
    length = 1 + 2 * n
  end
  out[top + 1] = length
  top = top + 1 + length
end
out[top + 1] = nil
return out
