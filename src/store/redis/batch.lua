-- Requests, each its own list of operations, decided in the order given: each request's
-- operations are decided together and consumed all-or-nothing, and the next request sees what
-- the previous ones consumed — exactly as if each had been its own call. The arithmetic is
-- src/limiter/*.rs's, in integers (microseconds, counts) that a Lua number (a double) holds
-- exactly below 2^53; the compiler keeps every product below that.
--
-- KEYS: every key the requests use, once each (state keys, and ban keys `{key}:ban`).
-- ARGV[1]: the numbers, packed as little-endian doubles (exact for these whole numbers below
-- 2^53) and read with `struct.unpack`: Lua's `tonumber` is C's `strtod`, which cost more than
-- the rest of a small operation. First the clock (1: read Redis's own with TIME, for nodes
-- that must share one; 0: each request's own) and the number of requests; then per request
-- its now (µs since the epoch) and number of operations, then nine per operation: code
-- (algorithm + 10 if enforced + 20 if it bans), cost, ban (µs), the algorithm's parameters
-- (1 fixed window: limit, window; 2 calendar: limit, start, end; 3 sliding window: limit,
-- window; 4 token bucket: capacity, count, period; 5 GCRA: capacity, emission interval;
-- 6 concurrency: max, lease; unused ones are 0), where its state key and its ban key (0:
-- none) are in KEYS, and where its lease id is in ARGV (concurrency; else 0).
-- A global limit (counted across regions, src/store/redis/region.rs) adds 80 to its code,
-- and carries in place of the lease position what this region adds for silent regions
-- (its partition mode); its window counts `o` too — the other regions' counts of the window
-- `ow`, written by region/merge.lua.
-- A settlement (a reservation settled after the response, src/limiter/settle.rs) is an
-- operation with code algorithm + 40, the difference (used − reserved, negative: a refund) in
-- place of the cost and the reservation's age (µs) in place of the ban; a request made of
-- settlements is always admitted, and its answer carries nothing to read.
-- ARGV[2…]: the lease ids, as text.
-- Returns, per request: the length of its answer, then the answer: admitted (0/1), then 6 per
-- operation: allowed, limit, remaining, reset (µs), retry after (µs, -1 = never), banned (0/1);
-- or, when every operation was allowed (the common case), 1 and then only remaining and reset
-- per operation: the caller knows the rest, and parsing the reply is most of what a call
-- costs the caller.
--
-- Cost on Redis's side matters (it is single-threaded and shared by every node), and most of
-- it is per redis.call and per number formatted to text. So a key's hash is read once per
-- call (the fields its algorithm uses: `s` window start, `c` count, `p` the previous
-- window's count; `l`/`u` a bucket's level and update time; `t` a GCRA TAT), the requests
-- read and update that copy, and each key changed is written once at the end (one command,
-- and its expiry when it changes): a hot key — a global limit, a busy client — costs two
-- commands per call however many of the call's requests count in it. A bucket or GCRA key's expiry is only
-- pushed out when it would end before the bucket is full again (the TAT is past), and then
-- to an eighth past that moment, so that steady traffic re-expires a key at most every eighth
-- of its refill time and an idle key lives at most 1/8 longer than its state matters (a full
-- bucket or a past TAT is the same as no key). Concurrency leases (a sorted set) and bans are
-- written as they happen.

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

-- Each key's fields as read, then updated by the requests: [1] s, [2] c, [3] p, [4] l, [5] u,
-- [6] t, each group read when an algorithm first needs it ([14] windows, [15] a bucket, [16]
-- a GCRA); what to write at the end: [7] s and c, [8] p, [17] only what was added to c, [9] l
-- and u, [10] t; its expiry: [11] 0 none, 1 PEXPIRE [12] ms, 2 keep at least [12] µs and else
-- extend to [13] µs; [18] whether it is in `changed`; a global limit's [19] o and [20] ow,
-- read once [21].
local keys = {}
local changed = {}
local function load(k, algo, global)
  local st = keys[k]
  if st == nil then
    st = {nil, 0, 0, nil, nil, nil, false, false, false, false, 0, 0, 0, false, false, false, 0, false, 0, -1, false}
    keys[k] = st
  end
  if algo <= 3 then
    if not st[14] then
      local v = redis.call('HMGET', KEYS[k], 's', 'c', 'p')
      st[1], st[2], st[3], st[14] = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0, true
    end
    if global and not st[21] then
      local v = redis.call('HMGET', KEYS[k], 'o', 'ow')
      st[19], st[20], st[21] = tonumber(v[1]) or 0, tonumber(v[2]) or -1, true
    end
  elseif algo == 4 then
    if not st[15] then
      local v = redis.call('HMGET', KEYS[k], 'l', 'u')
      st[4], st[5], st[15] = tonumber(v[1]), tonumber(v[2]), true
    end
  elseif not st[16] then
    st[6], st[16] = tonumber(redis.call('HGET', KEYS[k], 't')), true
  end
  return st
end
-- Ban keys' ends (µs; 0: none), read once per call.
local bans = {}

-- Each algorithm returns: allowed (0/1), limit, remaining, reset, retry after (-1 = never),
-- then the change to make if the request is admitted: kind and up to three numbers.
-- Kinds: 0 none; 1 count in the same window; 2 a new window (start, end); 3 a new sliding
-- window (start, previous count, expiry); 4 a bucket (level, µs to full, life); 5 a GCRA TAT
-- (tat, µs ahead, life); 6 a lease (expiry, the last lease's expiry).

-- `others`: what the other regions counted in this window, for a global limit (else 0).
local function window(st, limit, start, stop, cost, others)
  local count = others
  local same = st[1] == start
  if same then count = count + st[2] end
  local total = count + cost
  if total <= limit then
    if same then return 1, limit, limit - total, stop - now, -1, 1, 0, 0, 0 end
    return 1, limit, limit - total, stop - now, -1, 2, start, stop, 0
  end
  local retry = -1
  if cost <= limit then retry = stop - now end
  local remaining = limit - count
  if remaining < 0 then remaining = 0 end
  return 0, limit, remaining, stop - now, retry, 0, 0, 0, 0
end

-- A global limit's others in the window starting at `start`: what the other regions sent for
-- it, plus what this region adds for the silent ones.
local function others_in(st, start, extra)
  if st[20] == start then return st[19] + extra end
  return extra
end

-- When the estimate, with `count` weighted by what is left of its window, leaves `room`.
local function earliest(w, room, count)
  if count == 0 then return 0 end
  local keep = fdiv(room * w, count)
  if keep >= w then return 0 end
  return w - keep
end

local function sliding(st, limit, w, cost)
  local start = now - now % w
  local stop = start + w
  local sstart = st[1]
  local prev, cur = 0, 0
  if sstart == start then
    prev, cur = st[3], st[2]
  elseif sstart ~= nil and sstart + w == start then
    prev = st[2]
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

local function bucket(st, capacity, count, period, cost)
  local full = capacity * period
  local level = full
  if st[4] then
    level = st[4]
    local elapsed = now - (st[5] or now)
    if elapsed < 0 then
      -- In debt (a settlement took more than it held): refilling starts later.
      level = level + elapsed * count
    elseif elapsed >= cdiv(full - level, count) then
      -- Refill without overflowing: past the time to fill, the bucket is full.
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
  local remaining = 0
  if level > 0 then remaining = fdiv(level, period) end
  return 0, capacity, remaining, cdiv(full - level, count), retry, 0, 0, 0, 0
end

local function gcra(st, capacity, t, cost)
  local tolerance = capacity * t
  local tat = st[6] or now
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

-- Marks `st` (KEYS[k]) to be written at the end.
local function touch(k, st)
  if not st[18] then
    st[18] = true
    changed[#changed + 1] = k
  end
end
-- Its expiry: exactly `ms` from now (a new window), unless one is already set.
local function expire_in(st, ms)
  st[11], st[12] = 1, ms
end
-- How long a window's key outlives the window (µs): its length, at most 10 s — the longest
-- a request may wait for its store call (`store_timeout_ms`). A request stamped in the window
-- but decided just after it (a wait in a batch, a loaded node) then still finds the window's
-- count, instead of an expired key it would take for an empty window.
local function margin(w)
  if w > 10000000 then return 10000000 end
  return w
end
-- Or at least `need` µs from now, extended to `life` µs when it would end sooner.
local function keep(st, need, life)
  if st[11] ~= 1 then st[11], st[12], st[13] = 2, need, life end
end

-- Settles `delta` on KEYS[k] (algorithm `algo`, parameters p1-p3 as for a decision) for a
-- reservation counted at `counted`: src/limiter/settle.rs's arithmetic.
local function settle(k, algo, delta, counted, p1, p2, p3)
  if delta == 0 or algo == 6 then return end
  local st = load(k, algo)
  if algo <= 2 then
    local start, stop = p2, p3
    if algo == 1 then start = now - now % p2; stop = start + p2 end
    -- The reservation's window still counts; else only a debt, charged to this window.
    if (counted < start or counted >= stop) and delta < 0 then return end
    local count = 0
    if st[1] == start then count = st[2] end
    local new = count + delta
    if new < 0 then new = 0 end
    touch(k, st)
    if st[1] == start then
      st[2], st[17] = new, st[17] + (new - count)
    else
      st[1], st[2], st[7] = start, new, true
      expire_in(st, cdiv(stop - now + margin(stop - start), 1000) + 1)
    end
  elseif algo == 3 then
    local w = p2
    local start = now - now % w
    local prev, cur = 0, 0
    if st[1] == start then
      prev, cur = st[3], st[2]
    elseif st[1] ~= nil and st[1] + w == start then
      prev = st[2]
    end
    local counted_start = counted - counted % w
    if counted_start == start then
      cur = cur + delta
      if cur < 0 then cur = 0 end
    elseif counted_start + w == start then
      prev = prev + delta
      if prev < 0 then prev = 0 end
    elseif delta > 0 then
      cur = cur + delta
    else
      return
    end
    touch(k, st)
    st[1], st[3], st[2], st[7], st[8] = start, prev, cur, true, true
    expire_in(st, cdiv(start + 2 * w - now + margin(w), 1000) + 1)
  elseif algo == 4 then
    local capacity, count, period = p1, p2, p3
    local full = capacity * period
    local level = full
    if st[4] then
      local u = st[5] or now
      if now < u then
        level = st[4] - (u - now) * count
      elseif now - u >= cdiv(full - st[4], count) then
        level = full
      else
        level = st[4] + (now - u) * count
      end
    end
    level = level - delta * period
    if level > full then level = full end
    touch(k, st)
    if level >= 0 then
      st[4], st[5] = level, now
    else
      st[4], st[5] = 0, now + cdiv(-level, count)
    end
    st[9] = true
    local to_full = cdiv(full - level, count)
    keep(st, to_full, to_full + fdiv(to_full, 8))
  else
    local tat = st[6] or now
    if tat < now then tat = now end
    if delta < 0 and tat == now then return end
    tat = tat + delta * p2
    if tat < now then tat = now end
    touch(k, st)
    st[6], st[10] = tat, true
    keep(st, tat - now, tat - now + fdiv(tat - now, 8))
  end
end

-- Per operation of the request being decided: where its state key and ban key (0: none) are
-- in KEYS, its cost, where its lease id is in ARGV, its ban, whether it is enforced, and its
-- state; and the change to make. Reused from request to request.
local at = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local writes = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
-- Every request's answer, one after the other; built at its size for one request of up to
-- four operations (growing a Lua table step by step costs more than a small request). The
-- reply ends at the first nil, which is written after the last answer.
local out = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
local top = 0

for _ = 1, requests do
  local n
  now, n, pos = struct.unpack('<dd', ARGV[1], pos)
  if clock then now = clock end
  -- The request's time; an operation may decide at a later one (a key in a later window).
  local stamped = now
  -- This request's answer: its length at `top + 1`, admitted at `base`, then its operations.
  local base = top + 2
  local admitted = true
  for i = 1, n do
    now = stamped
    local code, cost, ban, p1, p2, p3, key_at, ban_at, lease_at
    code, cost, ban, p1, p2, p3, key_at, ban_at, lease_at, pos =
      struct.unpack('<ddddddddd', ARGV[1], pos)
    -- A global limit: what this region adds for silent regions, where a lease would be.
    local global, extra = code >= 80, 0
    if global then code, extra, lease_at = code - 80, lease_at, 0 end
    local algo, enforce = code % 10, code % 20 >= 10
    local c = (i - 1) * 7
    local banned_until = 0
    if ban_at > 0 then
      banned_until = bans[ban_at]
      if banned_until == nil then
        banned_until = tonumber(redis.call('GET', KEYS[ban_at])) or 0
        bans[ban_at] = banned_until
      end
    end
    local st = false
    local ok, limit, remaining, reset, retry, kind, wa, wb, wc
    local banned = 0
    if code >= 40 then
      -- A settlement: applied at once, nothing decided.
      settle(key_at, algo, cost, now - ban, p1, p2, p3)
      ok, limit, remaining, reset, retry = 1, p1, 0, 0, -1
      kind, wa, wb, wc = 0, 0, 0, 0
    elseif banned_until > now then
      ok, limit, remaining, reset, retry = 0, p1, 0, banned_until - now, banned_until - now
      kind, wa, wb, wc = 0, 0, 0, 0
      banned = 1
    elseif algo == 6 then
      ok, limit, remaining, reset, retry, kind, wa, wb, wc = concurrency(KEYS[key_at], p1, p2)
    else
      st = load(key_at, algo, global)
      -- A request stamped before the window its key already counts in (another node's clock a
      -- little behind, a wait in a batch across the boundary) is decided in that window, never
      -- by starting the earlier one again (src/limiter.rs, `not_before`).
      if algo <= 3 and st[1] ~= nil and st[1] > now then now = st[1] end
      if algo == 1 then
        local start = now - now % p2
        local others = 0
        if global then others = others_in(st, start, extra) end
        ok, limit, remaining, reset, retry, kind, wa, wb, wc = window(st, p1, start, start + p2, cost, others)
      elseif algo == 2 then
        -- The period the node computed, or the later one its key is in (its end estimated by
        -- the period's length: a boundary case of microseconds).
        local start, stop = p2, p3
        if st[1] ~= nil and st[1] > start then start, stop = st[1], st[1] + (p3 - p2) end
        local others = 0
        if global then others = others_in(st, start, extra) end
        ok, limit, remaining, reset, retry, kind, wa, wb, wc = window(st, p1, start, stop, cost, others)
      elseif algo == 3 then
        ok, limit, remaining, reset, retry, kind, wa, wb, wc = sliding(st, p1, p2, cost)
      elseif algo == 4 then
        ok, limit, remaining, reset, retry, kind, wa, wb, wc = bucket(st, p1, p2, p3, cost)
      else
        ok, limit, remaining, reset, retry, kind, wa, wb, wc = gcra(st, p1, p2, cost)
      end
    end
    at[c + 1], at[c + 2], at[c + 3], at[c + 4], at[c + 5], at[c + 6], at[c + 7] =
      key_at, ban_at, cost, lease_at, ban, enforce, st
    local b = base + (i - 1) * 6
    out[b + 1], out[b + 2], out[b + 3], out[b + 4], out[b + 5], out[b + 6] =
      ok, limit, remaining, reset, retry, banned
    local w = (i - 1) * 4
    writes[w + 1], writes[w + 2], writes[w + 3], writes[w + 4] = kind, wa, wb, wc
    if ok == 0 and enforce then admitted = false end
  end
  now = stamped

  if admitted then out[base] = 1 else out[base] = 0 end
  local short = admitted
  for i = 1, n do
    local b = base + (i - 1) * 6
    local c = (i - 1) * 7
    local w = (i - 1) * 4
    local ok = out[b + 1]
    if out[b + 6] == 1 then
      -- Banned: nothing to write.
      short = false
    elseif admitted and ok == 1 then
      local kind, wa, wb, wc = writes[w + 1], writes[w + 2], writes[w + 3], writes[w + 4]
      local st, cost = at[c + 7], at[c + 3]
      if kind == 1 then
        touch(at[c + 1], st)
        st[2], st[17] = st[2] + cost, st[17] + cost
      elseif kind == 2 then
        touch(at[c + 1], st)
        st[1], st[2], st[7] = wa, cost, true
        expire_in(st, cdiv(wb - now + margin(wb - wa), 1000) + 1)
      elseif kind == 3 then
        touch(at[c + 1], st)
        st[1], st[3], st[2], st[7], st[8] = wa, wb, cost, true, true
        expire_in(st, cdiv(wc - now + margin(fdiv(wc - wa, 2)), 1000) + 1)
      elseif kind == 4 then
        touch(at[c + 1], st)
        st[4], st[5], st[9] = wa, now, true
        keep(st, wb, wc)
      elseif kind == 5 then
        touch(at[c + 1], st)
        st[6], st[10] = wa, true
        keep(st, wb, wc)
      elseif kind == 6 then
        local key = KEYS[at[c + 1]]
        redis.call('ZADD', key, int(wa), ARGV[at[c + 4]])
        redis.call('PEXPIRE', key, int(cdiv(wb - now, 1000) + 1))
      end
    else
      short = false
      if ok == 0 and at[c + 6] and at[c + 2] ~= 0 then
        local ban = at[c + 5]
        redis.call('SET', KEYS[at[c + 2]], int(now + ban), 'PX', int(cdiv(ban, 1000) + 1))
        bans[at[c + 2]] = now + ban
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

-- Each key changed, written once: a new window whole, a count in the same window by what was
-- added (HINCRBY: other fields untouched), a bucket's or TAT's fields.
for i = 1, #changed do
  local k = changed[i]
  local st, key = keys[k], KEYS[k]
  if st[8] then
    redis.call('HSET', key, 's', int(st[1]), 'p', int(st[3]), 'c', int(st[2]))
  elseif st[7] then
    redis.call('HSET', key, 's', int(st[1]), 'c', int(st[2]))
  elseif st[17] ~= 0 then
    redis.call('HINCRBY', key, 'c', int(st[17]))
  end
  if st[9] then redis.call('HSET', key, 'l', int(st[4]), 'u', int(st[5])) end
  if st[10] then redis.call('HSET', key, 't', int(st[6])) end
  if st[11] == 1 then
    redis.call('PEXPIRE', key, int(st[12]))
  elseif st[11] == 2 and redis.call('PTTL', key) * 1000 < st[12] then
    redis.call('PEXPIRE', key, int(cdiv(st[13], 1000) + 1))
  end
end

out[top + 1] = nil
return out
