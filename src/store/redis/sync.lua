-- Local-first counts (`sync every`): adds what one node admitted since its last sync to the
-- shared counters and reads the totals back, for many keys in one call. The keys and fields
-- are batch.lua's (a window's hash: `s` its start, `c` its count; a sliding window's also
-- `p`, the window before), so exact and local-first nodes count together and a limit can move
-- from one mode to the other without losing its counts.
--
-- KEYS: per item, its state key, then its ban key (`{key}:ban`) when the limit bans.
-- ARGV[1]: the numbers, packed as little-endian doubles: the number of items, then six per
-- item: kind (1 a fixed window or calendar period, 3 a sliding window), the window's start
-- (µs), its end (fixed) or length (sliding), the increment (may be negative: a request the
-- node counted and then gave back), the node's time (µs) for the key's expiry, and its ban
-- (-1: the limit does not ban; 0: read the ban key; else a ban this node started, until then
-- in µs, written unless a later one is there).
-- Returns, per item: the previous window's count (sliding; else 0), the current window's
-- count as stored after the increment, and the end of the key's ban (µs; 0: none).

local n, pos = struct.unpack('<d', ARGV[1])
local out = {}
local function int(x) return string.format('%d', x) end
local function expire(key, stop, now)
  redis.call('PEXPIRE', key, int((stop - now - (stop - now) % 1000) / 1000 + 2))
end

local k = 1
for i = 1, n do
  local kind, start, span, inc, now, ban
  kind, start, span, inc, now, ban, pos = struct.unpack('<dddddd', ARGV[1], pos)
  local key = KEYS[k]
  k = k + 1
  local banned_until = 0
  if ban >= 0 then
    local ban_key = KEYS[k]
    k = k + 1
    banned_until = tonumber(redis.call('GET', ban_key)) or 0
    if ban > banned_until and ban > now then
      redis.call('SET', ban_key, int(ban), 'PX', int((ban - now - (ban - now) % 1000) / 1000 + 1))
      banned_until = ban
    end
  end
  local prev, cur = 0, 0
  if kind == 1 then
    local s = redis.call('HMGET', key, 's', 'c')
    local stored = tonumber(s[1])
    if stored == start then
      cur = tonumber(s[2]) or 0
      if inc ~= 0 then cur = redis.call('HINCRBY', key, 'c', int(inc)) end
    elseif (stored == nil or stored < start) and inc > 0 then
      redis.call('HSET', key, 's', int(start), 'c', int(inc))
      expire(key, span, now)
      cur = inc
    end
  else
    local s = redis.call('HMGET', key, 's', 'p', 'c')
    local stored = tonumber(s[1])
    if stored == start then
      prev, cur = tonumber(s[2]) or 0, tonumber(s[3]) or 0
      if inc ~= 0 then cur = redis.call('HINCRBY', key, 'c', int(inc)) end
    elseif stored == start + span then
      -- Counts of the window before the stored one (sent late): they are its `p`.
      if inc ~= 0 then redis.call('HINCRBY', key, 'p', int(inc)) end
    else
      if stored ~= nil and stored + span == start then prev = tonumber(s[3]) or 0 end
      if (stored == nil or stored < start) and inc > 0 then
        redis.call('HSET', key, 's', int(start), 'p', int(prev), 'c', int(inc))
        expire(key, start + 2 * span, now)
        cur = inc
      end
    end
  end
  if cur < 0 then cur = 0 end
  out[3 * i - 2], out[3 * i - 1], out[3 * i] = prev, cur, banned_until
end
return out
