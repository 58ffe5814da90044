-- Local-first counts (`sync every`): writes what one node admitted into the shared counters and
-- reads the totals back, for many keys in one call. The keys and fields are batch.lua's (a
-- window's hash: `s` its start, `c` its count; a sliding window's also `p`, the window
-- before), so exact and local-first nodes count together and a limit can move from one mode
-- to the other without losing its counts.
--
-- Idempotent: a node sends its whole count in a window (its component), never a delta. The
-- key keeps the component it last wrote, with the window and the sync's sequence number, in
-- a field of the node's own (`<node>a` or `<node>b`, one per window so that counts of the
-- window before, sent late, have theirs); `c` (or `p`) moves by the difference. A sync that
-- timed out on the node but ran when Redis went on, then sent again, moves nothing the second
-- time; an older call that runs after a newer one is ignored. When the node's field is gone
-- (an admin reset, an expired key), the node's last confirmed component is the base: only
-- what it admitted since counts.
--
-- KEYS: per item, its state key, then its ban key (`{key}:ban`) when the limit bans.
-- ARGV[1]: the numbers, packed as little-endian doubles: the number of items, the sync's
-- sequence number (grows with every sync of the node), then eight per item: kind (1 a fixed
-- window or calendar period, 3 a sliding window; + 10 for a node's part of its window before), the window's start (µs), its end (fixed) or
-- length (sliding), the node's component, the component as the node last saw it confirmed,
-- the node's field (0 or 1), the node's time (µs) for the key's expiry, and its ban (-1: the
-- limit does not ban; 0: read the ban key; else a ban this node started, until then in µs,
-- written unless a later one is there).
-- ARGV[2]: the node's id (its fields' names, with `a` or `b`).
-- Returns, per item: the previous window's count (sliding; else 0), the current window's
-- count as stored after the write, the end of the key's ban (µs; 0: none), and the component
-- Redis now holds for the node (what the node may count as confirmed).

local n, seq, pos = struct.unpack('<dd', ARGV[1])
local node = ARGV[2]
local out = {}
-- Fields past which a key's stale node fields (nodes gone, windows past) are removed: a
-- cluster of up to 30 nodes never pays for it.
local PRUNE_ABOVE = 64
local function int(x) return string.format('%d', x) end
local function expire(key, stop, now)
  redis.call('PEXPIRE', key, int((stop - now - (stop - now) % 1000) / 1000 + 2))
end
-- Removes node fields of windows before `keep_from` once the key holds many.
local function prune(key, keep_from)
  if redis.call('HLEN', key) <= PRUNE_ABOVE then return end
  local all = redis.call('HGETALL', key)
  for j = 1, #all, 2 do
    local field = all[j]
    -- One-letter fields are the counts; the others are nodes' components.
    if #field > 1 and #all[j + 1] == 24 and struct.unpack('<d', all[j + 1]) < keep_from then
      redis.call('HDEL', key, field)
    end
  end
end

local k = 1
for i = 1, n do
  local kind, start, span, comp, acked, slot, now, ban
  kind, start, span, comp, acked, slot, now, ban, pos =
    struct.unpack('<dddddddd', ARGV[1], pos)
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
  -- A node's part of the window before (`late`, kind + 10) is confirmed even where Redis
  -- holds a later window: that window is past. Its current part is not (see below).
  local late = kind >= 10
  if late then kind = kind - 10 end
  local field = node .. (slot == 0 and 'a' or 'b')
  local v = redis.call('HMGET', key, 's', 'c', 'p', field)
  local stored, count, before = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  -- What Redis already holds of this node in this window, and whether this call is newer.
  local base, fresh, known = acked, true, false
  if v[4] and #v[4] == 24 then
    local at, held, held_seq = struct.unpack('<ddd', v[4])
    if at == start then
      base, known = held, true
      fresh = seq > held_seq
    end
  end
  local inc = fresh and comp - base or 0
  local record = struct.pack('<ddd', start, comp, seq)
  local applied = fresh and comp or base
  local prev, cur = 0, 0
  -- Writes the node's component beside a count that moved (or stayed).
  local function keep(counter)
    if not fresh then return end
    if inc ~= 0 then redis.call('HINCRBY', key, counter, int(inc)) end
    redis.call('HSET', key, field, record)
    if not known then prune(key, kind == 1 and start or start - span) end
  end
  if kind == 1 then
    if stored == start then
      keep('c')
      cur = count + inc
    elseif (stored == nil or stored < start) and inc > 0 then
      redis.call('HSET', key, 's', int(start), 'c', int(inc), field, record)
      expire(key, span, now)
      prune(key, start)
      cur = inc
    elseif stored ~= nil and stored > start and not late then
      -- The node's clock is behind the window Redis holds (another node's is ahead): its
      -- count has nowhere to go. It keeps it as its own, unconfirmed, and counts against
      -- the later window's count meanwhile — never forgetting what it admitted.
      applied = base
      cur = count
    end
  else
    if stored == start then
      keep('c')
      prev, cur = before, count + inc
    elseif stored == start + span then
      -- Counts of the window before the stored one (sent late, or by a node whose clock is
      -- behind): they are its `p`, and that window's count is `p`.
      keep('p')
      cur = before + inc
    elseif stored ~= nil and stored > start + span and not late then
      -- Behind by more than a window: as for a fixed window.
      applied = base
      prev, cur = before, count
    else
      if stored ~= nil and stored + span == start then prev = count end
      if (stored == nil or stored < start) and inc > 0 then
        redis.call('HSET', key, 's', int(start), 'p', int(prev), 'c', int(inc), field, record)
        expire(key, start + 2 * span, now)
        prune(key, start - span)
        cur = inc
      end
    end
  end
  if cur < 0 then cur = 0 end
  out[4 * i - 3], out[4 * i - 2], out[4 * i - 1], out[4 * i] = prev, cur, banned_until, applied
end
return out
