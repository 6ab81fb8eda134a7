"""Every Lua script the service runs, in one place.

Each script is one atomic check-and-write in one hash slot. Every key arrives
through KEYS (see service/keys.py); scripts never build key names. JSON stays
opaque here: values arrive already encoded by Python and are stored as they
are, so Redis' cjson (which turns [] into {}) never touches client data.

The fields of the session hash and of the client index are described in
service/layout.py; the shared parts of every script (the clock, the rate
limit, replay records, the metadata, sliding expiry) are _PRELUDE below,
so that each script body holds only its own logic.

Session-scoped scripts share one calling convention:

    KEYS[1] session hash        KEYS[2] client index hash (also the client's
    KEYS[3] bucket expiry zset          rate-limit buckets and the replay
    KEYS[4] bucket clients zset         records of create and close)
    ARGV[1] client id the request names ('' = any)
    ARGV[2] replay record id: 16 bytes, binary ('' = no replay
            protection): an 8-byte digest naming the request (command,
            target, request id, requester), then an 8-byte fingerprint of
            its parameters (keys.replay_id)
    ARGV[3] replay window (ms)
    ARGV[4] session id          ARGV[5] client hash
    ARGV[6] rate-limit spec 'rate,burst,create_rate,create_burst,is_create' ('' = off)
    ARGV[7..] script-specific, documented in each header

Rate limiting is the first thing every script does, so it costs no extra
round trip: a refused request returns {'RATELIMITED', ms until retry} and
writes nothing.

Under maxmemory, Redis refuses a script's first write if that command may
grow memory, and never checks later ones (so as not to break atomicity).
Every script that grows memory therefore makes an HSET of the session its
first write: a full Redis refuses it cleanly, before anything changed.

Every script returns an array whose first element is a status: 'OK', or one
of 'NOTFOUND', 'CONFLICT' (+ current version), 'TOOLARGE' (over the byte
cap), 'TOOMANYKEYS' (over the state key cap), 'LIMIT' (+ live count), 'FULL'
(+ registry size), 'REUSED' (request id reused with other parameters),
'COLLISION' (a new session id already exists).

Size: a session costs sb + wb + ib + ob + hb + cb + OVERHEAD x (sn + rn +
history entries) bytes (service/limits.py), keys counted as a reply writes
them (klen). A write that would make it cost more than the cap is refused,
unless it costs no more than before (shrinking always works).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from service import layout, limits


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode("utf-8")).hexdigest())


_PRELUDE = r"""
local sid, chash = ARGV[4], ARGV[5]
-- The session's field in the client index: its id without the client hash
-- that every field there shares (layout.index_field).
local ient = string.sub(sid, #chash + 2)
local OVERHEAD = __ENTRY_OVERHEAD__  -- service.limits.ENTRY_OVERHEAD
local SLACK = __SLACK__              -- service.layout.EXPIRY_SLACK_MS
local REPLAY_MAX = __REPLAY_MAX__    -- service.layout.REPLAY_MAX
local INDEX_HEADROOM = __HEADROOM__  -- service.layout.INDEX_HEADROOM_MS

-- One clock reading per script call.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

-- Numbers handed to redis.call or joined into a string go through here, as
-- integers: Lua's own conversion (%.14g) rounds integers from 10^14 on, and
-- it and redis.call's (%.17g) print through C's floating-point formatting
-- (under callgrind, a timestamp joined with '..' cost Redis 4,500
-- instructions, through '%d' 2,700).
local function str(x)
  if type(x) == 'number' then return string.format('%d', x) end
  return x
end

-- A key's bytes as a reply writes it (service.limits.key_weight): JSON
-- escapes a control character in up to 6 bytes, and " and \\ in 2.
local function klen(k)
  -- One anchored match over the key: a third cheaper than an unanchored
  -- find of the special bytes, which restarts at every position.
  if string.find(k, '^[^%z\1-\31"\\]*$') then return #k end
  local _, ctrl = string.gsub(k, '[%z\1-\31]', '')
  local _, esc = string.gsub(k, '["\\]', '')
  return #k + 5 * ctrl + esc
end

-- unpack() has a stack limit: send long argument lists in chunks. Returns
-- the sum of the replies (HSET: fields created, HDEL: fields removed).
local function chunked(cmd, key, items)
  local total = 0
  for s = 1, #items, 1000 do
    total = total + redis.call(cmd, key, unpack(items, s, math.min(s + 999, #items)))
  end
  return total
end

-- Field names of the session hash that start with prefix.
local function prefixed(prefix)
  local out, n = {}, #prefix
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, n) == prefix then out[#out + 1] = f end
  end
  return out
end

-- Appends name, value of each field in names to reply (HMGETs of 1000 at most).
local function hmget_pairs(reply, names)
  for s = 1, #names, 1000 do
    local last = math.min(s + 999, #names)
    local values = redis.call('HMGET', KEYS[1], unpack(names, s, last))
    for j = 1, last - s + 1 do
      reply[#reply + 1] = names[s + j - 1]; reply[#reply + 1] = values[j]
    end
  end
  return reply
end

-- The leading number of an index entry: the session's exact expiry.
local function entry_expiry(packed)
  return tonumber(string.match(packed, '^(%d+)'))
end

-- The client index: its private fields are read once (index_read) and
-- every write to it is gathered (idx_set, idx_need) into one HSET at the
-- end (idx_flush), with a PEXPIREAT only when the key must live longer.
local idx_sets, idx_until = {}, 0
local function idx_set(f, v) idx_sets[#idx_sets + 1] = f; idx_sets[#idx_sets + 1] = str(v) end
local function idx_need(exp) if exp > idx_until then idx_until = exp end end

local function index_read(...)
  local names = {'!r', '!x', '!c', ...}
  local got = redis.call('HMGET', KEYS[2], unpack(names))
  local idx = {}
  for i = 1, #names do idx[names[i]] = got[i] end
  return idx
end

local function idx_flush(idx)
  local kx = tonumber(idx['!x'])
  if not kx then
    -- A new index, or one the previous release wrote: its TTL, once.
    local ttl = redis.call('PTTL', KEYS[2])
    kx = 0
    if ttl > 0 then kx = now + ttl; idx_set('!x', kx) end
    -- Never an index without a TTL, whatever this call writes to it.
    if kx == 0 then idx_need(now + INDEX_HEADROOM) end
  end
  -- Extended with headroom, so that its PEXPIREAT is rare: an index that
  -- outlives its sessions holds only dead entries (pruned by the next
  -- create, or housekeeping) until then.
  if idx_until > kx then idx_until = idx_until + INDEX_HEADROOM; idx_set('!x', idx_until) end
  if #idx_sets > 0 then chunked('HSET', KEYS[2], idx_sets) end
  if idx_until > kx then redis.call('PEXPIREAT', KEYS[2], str(idx_until)) end
end

-- A bucket's level now: tokens (a string; '' for a new bucket) at time at,
-- refilled at r per second up to cap.
local function level(tokens, at, r, cap)
  if not tokens or tokens == '' then return cap end
  return math.min(cap, tokens + (now - at) * r / 1000)
end

-- Plans by prefix (service/plans.py): ARGV[6] may carry, after a ';', the
-- prefixes of the plan assignments, when the front could not tell a session
-- owner's plan from its hash. The rate limit then waits for the owner
-- (load_meta): an owner that a prefix matches is sent back as
-- {'OWNER', client id} before anything is written, and the front asks
-- again with that client's own limits; any other goes on with these.
local plan_prefixes, deferred_rate = nil, nil

-- Token buckets in the index's '!r': g (every command) and c (create_session
-- too). Returns nil when the request may go on (its tokens are taken at
-- idx_flush), else {'RATELIMITED', ms until a token is back}.
local function rate_take(bucket, spec)
  local cut = string.find(spec, ';', 1, true)
  if cut then
    plan_prefixes = string.sub(spec, cut + 1)
    deferred_rate = {bucket, string.sub(spec, 1, cut - 1)}
    return nil
  end
  if spec == '' then return nil end
  local rate, burst, crate, cburst, create =
    string.match(spec, '^([^,]+),([^,]+),([^,]+),([^,]+),([01])$')
  rate, burst, crate, cburst = rate + 0, burst + 0, crate + 0, cburst + 0
  local gk, gat, ck, cat
  if bucket then gk, gat, ck, cat = string.match(bucket, '^([^,]*),([^,]*),([^,]*),([^,]*)$') end
  if not cat then gk, gat, ck, cat = '', '', '', '' end
  -- 'tokens,at' of each bucket, kept as it is when this request does not use it
  local g, c = gk .. ',' .. gat, ck .. ',' .. cat
  local wait, ttl = 0, 0
  if rate > 0 then
    ttl = math.ceil(burst * 1000 / rate)
    local lv = level(gk, gat, rate, burst)
    if lv < 1 then wait = math.ceil((1 - lv) * 1000 / rate) end
    g = string.format('%.4f,%d', lv - 1, now)
  end
  if create == '1' and crate > 0 then
    ttl = math.max(ttl, math.ceil(cburst * 1000 / crate))
    local lv = level(ck, cat, crate, cburst)
    if lv < 1 then wait = math.max(wait, math.ceil((1 - lv) * 1000 / crate)) end
    c = string.format('%.4f,%d', lv - 1, now)
  end
  if wait > 0 then return {'RATELIMITED', wait} end
  idx_set('!r', g .. ',' .. c)
  -- The buckets must outlive their refill, whatever the sessions do.
  idx_need(now + ttl + 1000)
  return nil
end

-- Replay records: the 8-byte fingerprint, then 'at:part2,part3,...', the
-- reply's parts after its status (a part that is the request's own time is
-- left out: it is at), valid until at + the window. A session keeps those
-- of its mutating requests in its field q, each behind its 8-byte digest
-- (';'-separated, newest first, REPLAY_MAX at most); create and close keep
-- theirs in the index under '!q' and the digest, each short enough (64
-- bytes at most) for the index to stay a listpack. Digest and fingerprint
-- are binary, so they may hold any byte (';' too): a record is read by
-- position, never split on a separator inside its first 16 (or 8) bytes.
-- Binary goes through '..', never string.format('%s'), which stops at a
-- zero byte.
local function replay_parse(rec, fp)
  local at, parts = string.match(rec, '^(%d+):(.*)$', 9)
  if not at or at + ARGV[3] <= now then return nil end
  if string.sub(rec, 1, 8) ~= fp then return {'REUSED'} end
  local out = {'OK', at = at}
  for p in string.gmatch(parts, '[^,]+') do out[#out + 1] = p end
  return out
end

local function replay_lookup(q)
  if ARGV[2] == '' or not q then return nil end
  local digest, s = string.sub(ARGV[2], 1, 8), 1
  while true do
    local e = string.find(q, ';', s + 16, true)
    if string.sub(q, s, s + 7) == digest then
      return replay_parse(string.sub(q, s + 8, (e or 0) - 1), string.sub(ARGV[2], 9))
    end
    if not e then return nil end
    s = e + 1
  end
end

-- The reply's parts after its status, joined with ',' (numbers through
-- str(): every reply part a record keeps is a whole number or a string).
local function replay_parts(reply, n)
  if n == 2 then return str(reply[2]) end  -- one part (most records): no table
  local parts = {}
  for i = 2, n do parts[#parts + 1] = str(reply[i]) end
  return table.concat(parts, ',')
end

-- q with this request's record in front and REPLAY_MAX records at most.
-- Records are newest first: when the newest has expired, so have all the
-- others, and q starts afresh; otherwise the oldest give way by count (an
-- expired record kept behind a live one is never answered: replay_parse).
local function replay_add(q, reply, n)
  local head = ARGV[2] .. str(now) .. ':' .. replay_parts(reply, n)
  if not q then return head end
  local at = tonumber(string.match(q, '^(%d+):', 17))
  if not at or at + ARGV[3] <= now then return head end
  local e, s = nil, 1
  for _ = 2, REPLAY_MAX do
    e = string.find(q, ';', s + 16, true)
    if not e then return head .. ';' .. q end
    s = e + 1
  end
  return head .. ';' .. string.sub(q, 1, e - 1)
end

-- The index-held record of a create or close: field '!q<digest>'.
local function index_replay_field()
  if ARGV[2] == '' then return nil end
  return '!q' .. string.sub(ARGV[2], 1, 8)
end

local function index_replay_save(f, reply, n)
  idx_set(f, string.sub(ARGV[2], 9) .. str(now) .. ':' .. replay_parts(reply, n))
  idx_need(now + ARGV[3])
end

__META_CODE__

-- A session the previous release wrote (separate metadata fields): its
-- counters from the fields themselves. Its next write stores it in this
-- release's layout (session_write).
local function legacy_meta()
  local o = redis.call('HMGET', KEYS[1], 'c', 'ca', 'lm', 'to', 'v', 'a', 'en', 'eo')
  if not o[1] then return nil end
  local m = {c = o[1], ca = tonumber(o[2]), lm = tonumber(o[3]), to = tonumber(o[4]),
    v = tonumber(o[5]), a = tonumber(o[6]), en = tonumber(o[7]) or 0, eo = tonumber(o[8]) or 1,
    sn = 0, sb = 0, sd = 0, rn = 0, ob = 0, hb = 0, legacy = true}
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local p = string.sub(f, 1, 2)
    if p == 's:' then
      m.sb = m.sb + klen(string.sub(f, 3)) + redis.call('HSTRLEN', KEYS[1], f)
      m.sn = m.sn + 1
    elseif p == 'o:' then
      m.ob = m.ob + klen(string.sub(f, 3)) + redis.call('HSTRLEN', KEYS[1], f)
      m.rn = m.rn + 1
    end
  end
  for n = m.eo, m.en do m.hb = m.hb + redis.call('HSTRLEN', KEYS[1], 'e:' .. str(n)) end
  m.cb = redis.call('HSTRLEN', KEYS[1], 'ci')
  m.wb = redis.call('HSTRLEN', KEYS[1], 'w')
  m.ib = redis.call('HSTRLEN', KEYS[1], 'i')
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl < 0 then ttl = m.to * 1000 end
  m.xe, m.ke = now + ttl, now + ttl
  return m
end

-- The session's metadata, or nil when it is gone (its exact expiry passed)
-- or another client's. m.q is its replay records; m.extra the values of
-- the other fields asked for, in order.
local function load_meta(...)
  local got = redis.call('HMGET', KEYS[1], 'm', 'q', ...)
  local m
  if got[1] then m = unpack_meta(got[1]) else m = legacy_meta() end
  if not m or (ARGV[1] ~= '' and m.c ~= ARGV[1]) or m.xe <= now then
    -- Gone or another's: the deferred limit refuses it as it would have
    -- refused it up front (the answer takes no token either way).
    if plan_prefixes then return nil, rate_take(deferred_rate[1], deferred_rate[2]) end
    return nil
  end
  if plan_prefixes then
    local owner = m.c or ''
    for p in string.gmatch(plan_prefixes, '[^\t]+') do
      if string.sub(owner, 1, #p) == p then return nil, {'OWNER', owner} end
    end
    local limited = rate_take(deferred_rate[1], deferred_rate[2])
    if limited then return nil, limited end
  end
  m.q = got[2] or nil
  m.extra = {}
  for i = 3, select('#', ...) + 2 do m.extra[#m.extra + 1] = got[i] end
  if m.legacy then
    for i = 1, select('#', ...) do m.extra[i] = redis.call('HGET', KEYS[1], (select(i, ...))) end
  end
  return m
end

local function cost(m)
  return m.sb + m.wb + m.ib + m.ob + m.hb + m.cb + OVERHEAD * (m.sn + m.rn + m.en - m.eo + 1)
end

-- True when the write that turned `before` (a cost) into m may not go ahead.
local function too_large(m, before, cap)
  local after = cost(m)
  return after > cap + 0 and after > before
end

-- Sliding expiry, first half: the exact expiry moves to now + timeout. The
-- key's own TTL moves only when that passes it (to xe + the slack): a key may
-- outlive its session by up to SLACK, invisibly (load_meta goes by xe).
-- Returns the key's new expiry when it must move (index_write does it).
local function refresh(m)
  m.xe = now + m.to * 1000
  if m.ke >= m.xe then return nil end
  -- A twentieth of the timeout at most: a short session's key goes soon.
  m.ke = m.xe + math.min(SLACK, m.to * 50)
  return m.ke
end

-- The session's writes, in one HSET (its first write: refused cleanly by a
-- full Redis): m, and the field, value pairs of sets. Returns how many of
-- the fields in sets it created.
local function session_write(m, sets)
  local all = {'m', pack_meta(m)}
  for i = 1, #sets do all[#all + 1] = sets[i] end
  local created = chunked('HSET', KEYS[1], all)
  if m.legacy then
    redis.call('HDEL', KEYS[1], __LEGACY_FIELDS__)
    created = created - 1  -- m itself
  end
  return created
end

local function index_entry(m)
  return string.format('%d|%d|%d|%d|%d|%d|%d', m.xe, m.ke - m.xe, m.ca, m.lm - m.ca, m.to, m.v, m.a)
end

-- The session's index entry, under its short field. A session the
-- previous release wrote had its entry and its expiry member under its
-- full id: both move to the short name (never counted twice).
local function index_entry_set(m)
  idx_set(ient, index_entry(m))
  if m.legacy then
    redis.call('HDEL', KEYS[2], sid)
    redis.call('ZREM', KEYS[3], sid)
    redis.call('ZADD', KEYS[3], str(m.xe), ient)
  end
end

-- Sliding expiry, second half (after session_write): the index scores are
-- exact (statistics count by them), the key's TTL moves when refresh said.
local function index_write(m, moved, idx)
  if moved then redis.call('PEXPIREAT', KEYS[1], str(moved)) end
  redis.call('ZADD', KEYS[3], str(m.xe), ient)
  if m.xe > (tonumber(idx['!c']) or 0) then
    redis.call('ZADD', KEYS[4], 'GT', str(m.xe), chash)
    idx_set('!c', m.xe)
  end
  index_entry_set(m)
  idx_need(m.ke)
end

-- After a session is gone: prune dead index entries and recompute the
-- client's latest expiry, which decides whether it counts as active.
-- `skip`: true to leave out this script's session (the one just deleted),
-- under its field or, written by the previous release, its full id.
local function client_refresh(skip)
  local entries = redis.call('HGETALL', KEYS[2])
  local latest, live, dead = 0, 0, {}
  for i = 1, #entries, 2 do
    local f = entries[i]
    if string.byte(f, 1) ~= 33 then  -- '!': not a session
      local exp = entry_expiry(entries[i + 1])
      if (skip and (f == ient or f == sid)) or exp <= now then
        dead[#dead + 1] = f
      else
        live = live + 1
        if exp > latest then latest = exp end
      end
    end
  end
  chunked('HDEL', KEYS[2], dead)
  if latest > 0 then redis.call('ZADD', KEYS[4], str(latest), chash)
  else redis.call('ZREM', KEYS[4], chash) end
  idx_set('!c', latest)
  return live
end

-- The content fields of the session into reply (field, value, ...), without
-- reading the checkpoints: every field but m, q, kh, k:* and kl:*
-- (context_only: w, i, o:* and e:*, what load_context sends).
local function content_of(reply, context_only)
  local names = {}
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    local p = string.sub(f, 1, 2)
    local keep
    if context_only then keep = f == 'w' or f == 'i' or p == 'o:' or p == 'e:'
    else
      keep = f ~= 'm' and f ~= 'q' and f ~= 'kh' and p ~= 'k:' and string.sub(f, 1, 3) ~= 'kl:'
    end
    if keep then names[#names + 1] = f end
  end
  return hmget_pairs(reply, names)
end

-- Checkpoints (layout.py), as one kit: the heads in 'kh'
-- ('n;id,v,at,bytes,auto;...', newest first), each snapshot in 'k:<id>', its
-- label in 'kl:<id>'. A script that may touch them calls checkpoint_kit()
-- when it does: its helpers are closures, built only then (an update's
-- merge never pays for them). A book gathers a script's changes: sets (for
-- session_write) and dels (HDEL).
local function checkpoint_kit()
  local function ckpt_open(kh)
    local book = {n = 0, list = {}, sets = {}, dels = {}}
    if not kh then return book end
    book.n = tonumber(string.match(kh, '^(%d+)'))
    for id, v, at, b, auto in string.gmatch(kh, ';(%d+),(%d+),(%d+),(%d+),(%d)') do
      book.list[#book.list + 1] = {id = id, v = v, at = at, b = tonumber(b), auto = auto}
    end
    return book
  end
  local function ckpt_heads(book)
    local out = {str(book.n)}
    for _, c in ipairs(book.list) do
      out[#out + 1] = string.format('%s,%s,%s,%d,%s', c.id, c.v, c.at, c.b, c.auto)
    end
    return table.concat(out, ';')
  end
  -- A field of the session's state or context (what a snapshot holds).
  local function is_content(f)
    local p = string.sub(f, 1, 2)
    return p == 's:' or p == 'o:' or p == 'e:' or f == 'w' or f == 'wv' or f == 'i'
      or f == 'ih' or f == 'so'
  end
  -- The session's state and context fields: names, and values. While the
  -- checkpoints' snapshots are small (SNAPSHOT_HGETALL bytes in all) one
  -- HGETALL reads them with the rest, cheaper than an HKEYS and an HMGET.
  local SNAPSHOT_HGETALL = 16384
  local function snapshot_read(book)
    local names, values, total = {}, {}, 0
    for _, c in ipairs(book.list) do total = total + c.b end
    if total <= SNAPSHOT_HGETALL then
      local all = redis.call('HGETALL', KEYS[1])
      for i = 1, #all, 2 do
        if is_content(all[i]) then
          names[#names + 1] = all[i]; values[#values + 1] = all[i + 1]
        end
      end
      return names, values
    end
    for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
      if is_content(f) then names[#names + 1] = f end
    end
    for s = 1, #names, 1000 do
      local got = redis.call('HMGET', KEYS[1], unpack(names, s, math.min(s + 999, #names)))
      for j = 1, #got do values[#values + 1] = got[j] end
    end
    return names, values
  end
  -- The session's state and context as one value (layout.pack_snapshot):
  -- cmsgpack packs in C what a Lua concatenation would copy over and over.
  local function snapshot_of(m, names, values)
    local counters = {m.sn, m.sb, m.sd, m.rn, m.ob, m.en, m.eo, m.hb, m.wb, m.ib}
    return cmsgpack.pack(counters, names, values)
  end
  -- A new checkpoint of the session as it is now, unless the caps refuse it:
  -- over max_checkpoints (maxn) or max_checkpoint_bytes (maxb), the oldest
  -- automatic ones give way (never `keep`, the id a restore reads); when only
  -- manual ones are left to go, nothing changes and it returns nil and the cap
  -- ('count' or 'bytes'). Else the new head, its snapshot in book.sets.
  local function ckpt_take(book, m, names, values, label, auto, maxn, maxb, keep)
    local blob = snapshot_of(m, names, values)
    local total, count = #blob, #book.list + 1
    for _, c in ipairs(book.list) do total = total + c.b end
    local gone, i = {}, #book.list
    while count > maxn or total > maxb do
      while i >= 1 and (book.list[i].auto ~= '1' or book.list[i].id == keep) do i = i - 1 end
      if i < 1 then
        if count > maxn then return nil, 'count' end
        return nil, 'bytes'
      end
      gone[book.list[i].id] = true
      total, count, i = total - book.list[i].b, count - 1, i - 1
    end
    local kept = {}
    for _, c in ipairs(book.list) do
      if gone[c.id] then
        book.dels[#book.dels + 1] = 'k:' .. c.id; book.dels[#book.dels + 1] = 'kl:' .. c.id
      else kept[#kept + 1] = c end
    end
    book.n = book.n + 1
    local head = {id = string.format('%d', book.n), v = string.format('%d', m.v),
      at = string.format('%d', now), b = #blob, auto = auto}
    table.insert(kept, 1, head)
    book.list = kept
    local sets = book.sets
    sets[#sets + 1] = 'k:' .. head.id; sets[#sets + 1] = blob
    if label then sets[#sets + 1] = 'kl:' .. head.id; sets[#sets + 1] = label end
    return head
  end
  -- Removes checkpoint id from the book; false when there is none.
  local function ckpt_remove(book, id)
    for i, c in ipairs(book.list) do
      if c.id == id then
        table.remove(book.list, i)
        book.dels[#book.dels + 1] = 'k:' .. id; book.dels[#book.dels + 1] = 'kl:' .. id
        return true
      end
    end
    return false
  end
  -- A snapshot's counters into m; its fields as HSET pairs.
  local function snapshot_apply(m, blob)
    local c, names, values = cmsgpack.unpack(blob)
    m.sn, m.sb, m.sd, m.rn, m.ob, m.en, m.eo, m.hb, m.wb, m.ib = unpack(c)
    local sets = {}
    for i = 1, #names do sets[#sets + 1] = names[i]; sets[#sets + 1] = values[i] end
    return sets
  end
  -- book.sets with the new heads: what session_write stores of the book.
  local function ckpt_sets(book)
    local sets = book.sets
    sets[#sets + 1] = 'kh'; sets[#sets + 1] = ckpt_heads(book)
    return sets
  end
  -- An automatic checkpoint before a command overwrites state or context:
  -- taken when the caps allow (ARGV positions of maxn and maxb given), else
  -- skipped; the command goes on either way. Returns 1 taken, 0 skipped.
  local function ckpt_auto(book, m, names, values, command, maxn_at, keep)
    local head = ckpt_take(book, m, names, values, 'before ' .. command, '1',
      tonumber(ARGV[maxn_at]), tonumber(ARGV[maxn_at + 1]), keep)
    if head then return 1 end
    return 0
  end
  return {open = ckpt_open, read = snapshot_read, take = ckpt_take, auto = ckpt_auto,
          remove = ckpt_remove, apply = snapshot_apply, sets = ckpt_sets}
end
"""


def _meta_code() -> str:
    """unpack_meta and pack_meta, unrolled over layout.META. The numbers are
    MessagePack, packed and read in C by cmsgpack: no number is printed or
    parsed in Lua, which cost the text form ('n,n,...,client') over twice as
    many Redis instructions (an anchored match of 19 captures, 18 strtod, a
    string.format of 19 arguments; benchmarks/rediscount.py). A session an
    earlier build wrote in text is read as such (its first byte is a digit,
    which no packed m starts with: xe never fits a one-byte integer) and
    packed at its next write."""
    names = layout.META
    pattern = "^" + "(%d+)," * len(names) + "(.*)$"
    fields = ", ".join(f"{n} = {n} + 0" for n in names)  # '+ 0': tonumber without a call
    locals_ = ", ".join(names)
    return f"""-- The metadata (layout.META, then the client id), packed in the field m.
local function unpack_meta(packed)
  local first = string.byte(packed)
  if first and first >= 48 and first <= 57 then
    local {locals_}, c = string.match(packed, '{pattern}')
    return {{{fields}, c = c}}
  end
  local {locals_}, c = cmsgpack.unpack(packed)
  -- Anything but what pack_meta wrote fails here, not later as a wrong answer.
  if type(c) ~= 'string' then error('malformed session metadata') end
  return {{{", ".join(f"{n} = {n}" for n in names)}, c = c}}
end

local function pack_meta(m)
  return cmsgpack.pack({", ".join("m." + n for n in names)}, m.c)
end"""


_PRELUDE = _PRELUDE.replace("__META_CODE__", _meta_code()).replace(
    "__LEGACY_FIELDS__", ", ".join(f"'{f}'" for f in layout.LEGACY_META)
)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT = re.compile(r"--[^\n]*")
# What a top-level block of the prelude defines: `local function f` and
# `local a, b = ...` at the start of a line (helpers' own locals are indented).
_DEFINED = re.compile(r"^local (?:function (\w+)|([\w, ]+?) =)", re.MULTILINE)


def _prelude_for(body: str) -> str:
    """The blocks of _PRELUDE (separated by blank lines) that body needs,
    directly or through another block, in their order. Every helper a Lua
    chunk defines is a closure built on each script call, so a script that
    carries only its own helpers spends less Redis time before its first
    line (benchmarks/rediscost.py measures the prelude's cost)."""
    def names(lua: str) -> set[str]:
        return set(_IDENTIFIER.findall(_COMMENT.sub("", lua)))

    blocks = _PRELUDE.strip("\n").split("\n\n")
    needed = names(body)
    kept: list[str] = []
    for block in reversed(blocks):
        defined = {name.strip() for m in _DEFINED.finditer(block) for group in m.groups()
                   if group for name in group.split(",")}
        if defined & needed:
            kept.append(block)
            needed |= names(block)
    return "\n\n".join(reversed(kept)) + "\n\n"


# replay_add keeps the newest record and REPLAY_MAX - 1 older ones.
assert layout.REPLAY_MAX >= 2, "replay_add needs room for one older record"


def _script(name: str, body: str) -> Script:
    prelude = (
        _prelude_for(body).replace("__ENTRY_OVERHEAD__", str(limits.ENTRY_OVERHEAD))
        .replace("__SLACK__", str(layout.EXPIRY_SLACK_MS))
        .replace("__REPLAY_MAX__", str(layout.REPLAY_MAX))
        .replace("__HEADROOM__", str(layout.INDEX_HEADROOM_MS))
    )
    return Script(name, prelude + body)


CREATE = _script(
    "create",
    r"""
-- create_session
-- KEYS: common, KEYS[1] is the new session's hash.
-- ARGV[1] client id (required here), ARGV[7] timeout (s), ARGV[8] client_info
--   JSON or '', ARGV[9] max live sessions per client.
-- Returns {'OK', session_id, created_ms, expires_ms} | {'LIMIT', live} | {'REUSED'}
--   | {'COLLISION'}.
local qf = index_replay_field()
local entries = redis.call('HGETALL', KEYS[2])
local idx, live, dead = {}, 0, {}
local window = tonumber(ARGV[3])
for i = 1, #entries, 2 do
  local f, v = entries[i], entries[i + 1]
  if string.byte(f, 1) == 33 then  -- '!': the index's own fields
    idx[f] = v
    if string.sub(f, 1, 2) == '!q' and f ~= qf then
      local at = tonumber(string.match(v, '^(%d+):', 9))
      if not at or at + window <= now then dead[#dead + 1] = f end
    end
  elseif entry_expiry(v) <= now then dead[#dead + 1] = f
  else live = live + 1 end
end
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local to = tonumber(ARGV[7])
if qf and idx[qf] then
  local r = replay_parse(idx[qf], string.sub(ARGV[2], 9))
  if r and r[1] == 'REUSED' then return r end
  -- The record keeps the id's random part and the time; the rest follows.
  if r then return {'OK', chash .. '.' .. r[2], tonumber(r.at), tonumber(r.at) + to * 1000} end
end
if live >= tonumber(ARGV[9]) then return {'LIMIT', live} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'COLLISION'} end
local m = {c = ARGV[1], ca = now, lm = now, to = to, v = 1, a = 1, sn = 0, sb = 0, sd = 0,
  cb = #ARGV[8], rn = 0, ob = 0, en = 0, eo = 1, hb = 0, wb = 0, ib = 0, ke = 0}
local moved = refresh(m)
if ARGV[8] ~= '' then session_write(m, {'ci', ARGV[8]}) else session_write(m, {}) end
chunked('HDEL', KEYS[2], dead)
-- Amortised pruning of the bucket indexes; counting never depends on it.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', str(now))
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', str(now))
index_write(m, moved, idx)
if qf then index_replay_save(qf, {'OK', ient}, 2) end
idx_flush(idx)
return {'OK', sid, now, m.xe}
""",
)

RESTORE = _script(
    "restore",
    r"""
-- restore_session: reactivate, refresh, return everything.
-- ARGV: common only.
-- Returns {'OK', now_ms, m, kh | false, field1, value1, ...} (the content
--   fields: every field but m, q and the checkpoints') | {'NOTFOUND'}. Without
--   checkpoints (no kh) one HGETALL; with them, their snapshots are not read.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
m.a = 1
local moved = refresh(m)
session_write(m, {})
index_write(m, moved, idx)
idx_flush(idx)
local reply = {'OK', now, pack_meta(m), m.extra[1] or false}
if m.extra[1] then return content_of(reply, false) end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  if f ~= 'm' and f ~= 'q' then reply[#reply + 1] = f; reply[#reply + 1] = all[i + 1] end
end
return reply
""",
)

UPDATE = _script(
    "update",
    r"""
-- update_session_state: top-level merge (or replace) of the state.
-- ARGV[7] expected version or '', ARGV[8] '1' to replace the whole state,
--   ARGV[9] max session bytes, ARGV[10] max state keys, ARGV[11] max
--   checkpoints, ARGV[12] max checkpoint bytes (a replace first takes an
--   automatic checkpoint when the caps allow),
--   ARGV[13..] key, JSON value pairs ('' removes the key), each key once.
-- Returns {'OK', version, last_modified_ms, automatic checkpoint taken (1/0),
--   's:key', json, ...} | {'NOTFOUND'}
--   | {'CONFLICT', version} | {'TOOLARGE'} | {'TOOMANYKEYS'} | {'REUSED'}.
--   The fields are the state keys the update did not name (none after a
--   replace): the caller has the others, so they are not read back.
local replace = ARGV[8] == '1'
local function untouched(reply, sn)
  if replace then return reply end
  local named, kept = {}, 0
  for i = 13, #ARGV, 2 do
    named['s:' .. ARGV[i]] = true
    if ARGV[i + 1] ~= '' then kept = kept + 1 end
  end
  -- Every key the state holds was named (and so is in the caller's hands).
  if sn and sn == kept then return reply end
  local want = {}
  for _, f in ipairs(prefixed('s:')) do
    if not named[f] then want[#want + 1] = f end
  end
  return hmget_pairs(reply, want)
end
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then
  if r[1] == 'REUSED' then return r end
  return untouched({'OK', r[2], r.at, 0})
end
if ARGV[7] ~= '' and ARGV[7] + 0 ~= m.v then return {'CONFLICT', m.v} end
-- Taken now, of the state before any change; written only if the update is.
local ck, book, took, names = nil, nil, 0, nil
if replace then
  ck = checkpoint_kit()
  book = ck.open(m.extra[1])
  local values
  names, values = ck.read(book)
  took = ck.auto(book, m, names, values, 'update_session_state', 11, '')
end
local before, keys_before = cost(m), m.sn
local sets, dels, nset, add = {}, {}, 0, 0
for i = 13, #ARGV, 2 do
  if ARGV[i + 1] == '' then dels[#dels + 1] = 's:' .. ARGV[i]
  else
    sets[#sets + 1] = 's:' .. ARGV[i]; sets[#sets + 1] = ARGV[i + 1]
    nset, add = nset + 1, add + klen(ARGV[i]) + #ARGV[i + 1]
  end
end
-- sn is exact; sb is an upper bound: a merge adds the new values' bytes
-- without reading the old ones' lengths, and sd says how many bytes of sb
-- were added so (0: sb is exact). The bound decides first; only a write it
-- would refuse reads the named keys' lengths, and only one still refused
-- then counts the whole state (at most max_state_keys HSTRLEN; a refused
-- write changes nothing, so a refusal repeats that count until a write
-- that passes stores the exact sb).
local old, exact = {}, replace
local maxkeys = ARGV[10] + 0
if replace then
  -- The state's keys, from the names the checkpoint read (one HKEYS).
  for _, f in ipairs(names) do
    if string.sub(f, 1, 2) == 's:' then old[#old + 1] = f end
  end
  m.sb, m.sn, m.sd = add, nset, 0
else
  local sb, sn = m.sb, m.sn
  m.sb, m.sn = sb + add, sn + nset
  if m.sn > maxkeys or too_large(m, before, ARGV[9]) then
    exact = true
    local function named_delta(base)
      m.sb, m.sn = base, sn
      for i = 13, #ARGV, 2 do
        local n = redis.call('HSTRLEN', KEYS[1], 's:' .. ARGV[i])
        if n > 0 then m.sb, m.sn = m.sb - klen(ARGV[i]) - n, m.sn - 1 end
        if ARGV[i + 1] ~= '' then m.sb, m.sn = m.sb + klen(ARGV[i]) + #ARGV[i + 1], m.sn + 1 end
      end
    end
    named_delta(sb)
    local refused = (m.sn > maxkeys and m.sn > sn) or too_large(m, before, ARGV[9])
    if refused and m.sd > 0 then
      local counted = 0
      for _, f in ipairs(prefixed('s:')) do
        counted = counted + klen(string.sub(f, 3)) + redis.call('HSTRLEN', KEYS[1], f)
      end
      m.sb, m.sd = counted, 0
      before = cost(m)
      named_delta(counted)
      refused = (m.sn > maxkeys and m.sn > sn) or too_large(m, before, ARGV[9])
    end
    if refused then
      if m.sn > maxkeys and m.sn > sn then return {'TOOMANYKEYS'} end
      return {'TOOLARGE'}
    end
  else
    -- Written as if every key named was there already; corrected below
    -- (one more HSET) when the write says otherwise.
    m.sn = math.max(0, sn - #dels)
    m.sd = m.sd + add
  end
  keys_before = sn
end
if replace then
  if m.sn > maxkeys and m.sn > keys_before then return {'TOOMANYKEYS'} end
  if too_large(m, before, ARGV[9]) then return {'TOOLARGE'} end
end
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local reply = {'OK', m.v, now, took}
local q_new = false
if ARGV[2] ~= '' then
  sets[#sets + 1] = 'q'; sets[#sets + 1] = replay_add(m.q, reply, 2)  -- v (lm is at)
  q_new = m.q == nil
end
if replace then
  -- The old keys go first, the new ones after: a key in both stays.
  session_write(m, ck.sets(book))
  chunked('HDEL', KEYS[1], book.dels)
  chunked('HDEL', KEYS[1], old)
  chunked('HSET', KEYS[1], sets)
else
  local created = session_write(m, sets)
  if q_new then created = created - 1 end
  local removed = chunked('HDEL', KEYS[1], dels)
  if not exact then
    local actual = keys_before + created - removed
    if actual ~= m.sn then
      m.sn = actual
      redis.call('HSET', KEYS[1], 'm', pack_meta(m))
    end
  end
  dels = {}
end
chunked('HDEL', KEYS[1], dels)
index_write(m, moved, idx)
idx_flush(idx)
return untouched(reply, m.sn)
""",
)

CLOSE = _script(
    "close",
    r"""
-- close_session.
-- ARGV[7] '1' to keep the session (inactive, restorable) until it expires.
-- Returns {'OK', state_saved (1/0)} | {'NOTFOUND'} | {'REUSED'}.
-- The replay record lives in the index: a retried close that deleted the
-- session is still answered.
local qf = index_replay_field()
local idx = index_read(qf)
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
if qf and idx[qf] then
  local r = replay_parse(idx[qf], string.sub(ARGV[2], 9))
  if r then return r end
end
local m, early = load_meta()
if not m then return early or {'NOTFOUND'} end
local saved = 0
if ARGV[7] == '1' then
  m.a = 0
  session_write(m, {})
  index_entry_set(m)
  saved = 1
else
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[3], ient, sid)  -- sid: as the previous release named it
  client_refresh(true)
end
local reply = {'OK', saved}
if qf then index_replay_save(qf, reply, 2) end
idx_flush(idx)
return reply
""",
)

INFO = _script(
    "info",
    r"""
-- get_session_info (no refresh).
-- ARGV: common only.
-- Returns {'OK', now_ms, m, client_info JSON | false, kh | false} | {'NOTFOUND'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('ci', 'kh')
if not m then return early or {'NOTFOUND'} end
idx_flush(idx)
return {'OK', now, pack_meta(m), m.extra[1] or false, m.extra[2] or false}
""",
)

LIST = _script(
    "list",
    r"""
-- list_client_sessions (no refresh).
-- KEYS[1], KEYS[2]: the client index hash (twice: the prelude's convention).
-- ARGV[5] client hash, ARGV[6] rate-limit spec ('' = off), the others ''.
-- Returns {'OK', now_ms, index field, entry (layout.IndexEntry), ...}
--   | {'RATELIMITED', ms}: each field the session id's random part, or the
--   full id under which the previous release kept it (layout.session_of_field).
local entries = redis.call('HGETALL', KEYS[2])
local idx, out, dead = {}, {'OK', now}, {}
for i = 1, #entries, 2 do
  local f = entries[i]
  if string.byte(f, 1) == 33 then idx[f] = entries[i + 1]
  elseif entry_expiry(entries[i + 1]) <= now then dead[#dead + 1] = f
  else out[#out + 1] = f; out[#out + 1] = entries[i + 1] end
end
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
chunked('HDEL', KEYS[2], dead)
if #idx_sets > 0 then idx_flush(idx) end
return out
""",
)

RATE = _script(
    "rate",
    r"""
-- The rate limit alone, for commands that otherwise never reach Redis
-- (ping, describe) or read only bucket indexes (statistics) but name a client.
-- KEYS[1], KEYS[2]: the client's index hash (twice: the prelude's convention).
-- ARGV[5] client hash, ARGV[6] rate-limit spec, the others ''.
-- Returns {'OK'} | {'RATELIMITED', ms}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
idx_flush(idx)
return {'OK'}
""",
)

STATS = Script(
    "stats",
    r"""
-- get_session_statistics, one bucket: exact live counts, O(log n), no SCAN
-- (the zsets are scored by each session's exact expiry, xe).
-- KEYS[1] bucket expiry zset, KEYS[2] bucket clients zset. ARGV: none.
-- Returns {live_sessions, active_clients}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local bound = '(' .. string.format('%d', now)
return {redis.call('ZCOUNT', KEYS[1], bound, '+inf'), redis.call('ZCOUNT', KEYS[2], bound, '+inf')}
""",
)

SAVE_CONTEXT = _script(
    "save_context",
    r"""
-- save_context: replace the parts of the context that the request names.
-- ARGV[7] expected version or '', ARGV[8] max session bytes,
--   ARGV[9] workspace_context JSON ('-' untouched, '' clear), ARGV[10] its variable count,
--   ARGV[11] inspector_state JSON ('-' untouched, '' clear), ARGV[12] its history length,
--   ARGV[13] its selected object JSON,
--   then R (registry entry count, -1 untouched) and R pairs object id, entry JSON,
--   then H (history entry count, -1 untouched) and H entry JSONs, oldest first.
-- Returns {'OK', version, last_modified_ms, context_bytes} | {'NOTFOUND'}
--   | {'CONFLICT', version} | {'TOOLARGE'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta()
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then return r end
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= m.v then return {'CONFLICT', m.v} end
local before = cost(m)
local w, ins = ARGV[9], ARGV[11]
if w ~= '-' then m.wb = #w end
if ins ~= '-' then m.ib = #ins end
local pos = 14
local nreg = tonumber(ARGV[pos])
local reg_at = pos + 1
local old_reg, old_hist = {}, {}
if nreg >= 0 then
  old_reg = prefixed('o:')
  local ob = 0
  for k = 0, nreg - 1 do ob = ob + klen(ARGV[reg_at + 2 * k]) + #ARGV[reg_at + 2 * k + 1] end
  m.ob, m.rn = ob, nreg
  pos = reg_at + 2 * nreg
else
  pos = reg_at
end
local nhist = tonumber(ARGV[pos])
local hist_at = pos + 1
if nhist >= 0 then
  for n = m.eo, m.en do old_hist[#old_hist + 1] = 'e:' .. str(n) end
  local hb = 0
  for k = 0, nhist - 1 do hb = hb + #ARGV[hist_at + k] end
  m.hb = hb
  m.eo = m.en + 1
  m.en = m.en + nhist
end
if too_large(m, before, ARGV[8]) then return {'TOOLARGE'} end
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local xb = m.wb + m.ib + m.ob + m.hb
local reply = {'OK', m.v, now, xb}
local sets, dels = {}, {}
if ARGV[2] ~= '' then sets[1] = 'q'; sets[2] = replay_add(m.q, reply, 4) end
if w == '' then dels[#dels + 1] = 'w'; dels[#dels + 1] = 'wv'
elseif w ~= '-' then sets[#sets + 1] = 'w'; sets[#sets + 1] = w
  sets[#sets + 1] = 'wv'; sets[#sets + 1] = ARGV[10] end
if ins == '' then dels[#dels + 1] = 'i'; dels[#dels + 1] = 'ih'; dels[#dels + 1] = 'so'
elseif ins ~= '-' then sets[#sets + 1] = 'i'; sets[#sets + 1] = ins
  sets[#sets + 1] = 'ih'; sets[#sets + 1] = ARGV[12]
  sets[#sets + 1] = 'so'; sets[#sets + 1] = ARGV[13] end
session_write(m, sets)
chunked('HDEL', KEYS[1], dels)
if nreg >= 0 then
  chunked('HDEL', KEYS[1], old_reg)
  local reg = {}
  for k = 0, nreg - 1 do
    reg[#reg + 1] = 'o:' .. ARGV[reg_at + 2 * k]
    reg[#reg + 1] = ARGV[reg_at + 2 * k + 1]
  end
  chunked('HSET', KEYS[1], reg)
end
if nhist >= 0 then
  chunked('HDEL', KEYS[1], old_hist)
  local hist = {}
  for k = 0, nhist - 1 do
    hist[#hist + 1] = 'e:' .. str(m.eo + k)
    hist[#hist + 1] = ARGV[hist_at + k]
  end
  chunked('HSET', KEYS[1], hist)
end
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

LOAD_CONTEXT = _script(
    "load_context",
    r"""
-- load_context (refreshes).
-- ARGV: common only.
-- Returns {'OK', field, value, ...} for the fields w, i, o:<id> and e:<n> | {'NOTFOUND'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
local moved = refresh(m)
session_write(m, {})
index_write(m, moved, idx)
idx_flush(idx)
local reply = {'OK'}
if m.extra[1] then return content_of(reply, true) end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f = all[i]
  local p = string.sub(f, 1, 2)
  if f == 'w' or f == 'i' or p == 'o:' or p == 'e:' then
    reply[#reply + 1] = f; reply[#reply + 1] = all[i + 1]
  end
end
return reply
""",
)

SUMMARY = _script(
    "summary",
    r"""
-- get_context_summary (no refresh).
-- ARGV: common only.
-- Returns {'OK', variable_count, inspector_history_length, selected_object JSON|false,
--   registry_size, newest entry number, oldest entry number, context_bytes,
--   last_modified_ms} | {'NOTFOUND'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('wv', 'ih', 'so')
if not m then return early or {'NOTFOUND'} end
idx_flush(idx)
local s = m.extra
return {'OK', tonumber(s[1]) or 0, tonumber(s[2]) or 0, s[3] or false, m.rn, m.en, m.eo,
  m.wb + m.ib + m.ob + m.hb, m.lm}
""",
)

CLEAR_CONTEXT = _script(
    "clear_context",
    r"""
-- clear_context.
-- ARGV[7] the parts to clear, as letters: w workspace, i inspector, o registry, e history.
-- ARGV[8] max checkpoints, ARGV[9] max checkpoint bytes: an automatic
--   checkpoint of state and context comes first, when the caps allow and a
--   named part holds anything (a clear that removes nothing has nothing to
--   undo, and its checkpoint would push out an older automatic one).
-- Returns {'OK', version, automatic checkpoint taken (1/0)} | {'NOTFOUND'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then r[3] = 0; return r end
local parts = ARGV[7]
local function has(letter) return string.find(parts, letter, 1, true) ~= nil end
local held = (has('w') and m.wb > 0) or (has('i') and m.ib > 0)
  or (has('o') and m.rn > 0) or (has('e') and m.en >= m.eo)
local ck = checkpoint_kit()
local book = ck.open(m.extra[1])
local names, took = {}, 0
if held then
  local values
  names, values = ck.read(book)
  took = ck.auto(book, m, names, values, 'clear_context', 8, '')
end
local del = book.dels
if has('w') then m.wb = 0; del[#del + 1] = 'w'; del[#del + 1] = 'wv' end
if has('i') then m.ib = 0; del[#del + 1] = 'i'; del[#del + 1] = 'ih'; del[#del + 1] = 'so' end
if has('o') then
  -- The registry's fields, from the names the checkpoint read.
  for _, f in ipairs(names) do
    if string.sub(f, 1, 2) == 'o:' then del[#del + 1] = f end
  end
  m.ob, m.rn = 0, 0
end
if has('e') then
  for n = m.eo, m.en do del[#del + 1] = 'e:' .. str(n) end
  m.hb, m.eo = 0, m.en + 1
end
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local reply = {'OK', m.v, took}
local sets = ck.sets(book)
if ARGV[2] ~= '' then sets[#sets + 1] = 'q'; sets[#sets + 1] = replay_add(m.q, reply, 2) end
session_write(m, sets)
chunked('HDEL', KEYS[1], del)
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

RECORD_EVALUATION = _script(
    "record_evaluation",
    r"""
-- record_evaluation: append to the history, keeping the newest entries.
-- ARGV[7] entry JSON, ARGV[8] history limit, ARGV[9] max session bytes.
-- Returns {'OK', evaluation_count, version} | {'NOTFOUND'} | {'TOOLARGE'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta()
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then return r end
local before = cost(m)
local en, eo = m.en + 1, m.eo
local limit = tonumber(ARGV[8])
local added = #ARGV[7]
local evict = {}
while en - eo + 1 > limit do
  local f = 'e:' .. str(eo)
  added = added - redis.call('HSTRLEN', KEYS[1], f)
  evict[#evict + 1] = f
  eo = eo + 1
end
m.en, m.eo, m.hb = en, eo, m.hb + added
if too_large(m, before, ARGV[9]) then return {'TOOLARGE'} end
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local reply = {'OK', en - eo + 1, m.v}
local sets = {'e:' .. str(en), ARGV[7]}
if ARGV[2] ~= '' then sets[3] = 'q'; sets[4] = replay_add(m.q, reply, 3) end
session_write(m, sets)
chunked('HDEL', KEYS[1], evict)
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

REGISTER_OBJECT = _script(
    "register_object",
    r"""
-- register_object: add or replace one registry entry.
-- ARGV[7] object id, ARGV[8] entry JSON, ARGV[9] registry cap, ARGV[10] max session bytes.
-- Returns {'OK', registry_size, version} | {'NOTFOUND'} | {'FULL', size} | {'TOOLARGE'}
--   | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta()
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then return r end
local f = 'o:' .. ARGV[7]
local old = redis.call('HSTRLEN', KEYS[1], f)
if old == 0 and m.rn >= tonumber(ARGV[9]) then return {'FULL', m.rn} end
local before = cost(m)
local added = #ARGV[8]
if old == 0 then added, m.rn = added + klen(ARGV[7]), m.rn + 1 else added = added - old end
m.ob = m.ob + added
if too_large(m, before, ARGV[10]) then return {'TOOLARGE'} end
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local reply = {'OK', m.rn, m.v}
local sets = {f, ARGV[8]}
if ARGV[2] ~= '' then sets[3] = 'q'; sets[4] = replay_add(m.q, reply, 3) end
session_write(m, sets)
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

RELEASE_OBJECT = _script(
    "release_object",
    r"""
-- release_object: drop one registry entry (refreshes even when there was none).
-- ARGV[7] object id.
-- Returns {'OK', released (1/0), registry_size, version} | {'NOTFOUND'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta()
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then return r end
local f = 'o:' .. ARGV[7]
local old = redis.call('HSTRLEN', KEYS[1], f)
local released = 0
if old > 0 then
  released = 1
  local gone = klen(ARGV[7]) + old
  m.v, m.lm, m.rn = m.v + 1, now, m.rn - 1
  m.ob = math.max(0, m.ob - gone)
end
local moved = refresh(m)
local reply = {'OK', released, m.rn, m.v}
local sets = {}
if ARGV[2] ~= '' then sets = {'q', replay_add(m.q, reply, 4)} end
session_write(m, sets)
if old > 0 then redis.call('HDEL', KEYS[1], f) end
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

RESTORE_BACKUP = _script(
    "restore_backup",
    r"""
-- restore_backup: put one session from a backup file back (stui-sessions restore),
-- with its remaining time, and rebuild its three index entries.
-- The fields were validated and their sizes recomputed by service/restore.py;
-- this script adds what only Redis can check: the clock and the client's
-- live sessions.
-- KEYS[1..4] as every session script (no replay, no rate limit). ARGV[1..3], ARGV[6]: ''.
-- ARGV[7] exact expiry (ms), ARGV[8] '1' to overwrite a newer or equal version,
--   ARGV[9] max live sessions per client,
--   ARGV[10] the metadata without its first two numbers (layout.pack_template),
--   ARGV[11..] the content fields as field, value pairs.
-- The expiry is brought back to now + timeout when it lies beyond it (a
-- backup read on a node whose clock was ahead).
-- Returns {'OK'} | {'EXPIRED'} | {'NEWER', stored version} | {'LIMIT', live}.
local exp = tonumber(ARGV[7])
if exp <= now then return {'EXPIRED'} end
local m = unpack_meta('0,0,' .. ARGV[10])
local sets, keep = {'m', ''}, {m = true}
for i = 11, #ARGV, 2 do
  sets[#sets + 1] = ARGV[i]; sets[#sets + 1] = ARGV[i + 1]; keep[ARGV[i]] = true
end
local got = redis.call('HMGET', KEYS[1], 'm', 'v')
local stored = tonumber(got[2])
if got[1] then
  local held = unpack_meta(got[1])
  stored = held.v
  -- A key that outlives its session (layout.EXPIRY_SLACK_MS) holds no session.
  if held.xe <= now then stored = nil end
end
local present = got[1] or got[2]
if stored and ARGV[8] ~= '1' and stored >= m.v then return {'NEWER', stored} end
m.xe = math.min(exp, now + m.to * 1000)
m.ke = m.xe
sets[2] = pack_meta(m)
-- This release's field, or the previous release's (the full id).
local held_entry = redis.call('HMGET', KEYS[2], ient, sid)
local entry = held_entry[1] or held_entry[2]
if not (stored and entry and entry_expiry(entry) > now) then
  -- A session new to the client: it must fit under the client's limit.
  local live = 0
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    if string.byte(entries[i], 1) ~= 33 and entry_expiry(entries[i + 1]) > now then
      live = live + 1
    end
  end
  if live >= tonumber(ARGV[9]) then return {'LIMIT', live} end
end
-- First write: refused cleanly by a full Redis (see the module docstring).
chunked('HSET', KEYS[1], sets)
local extra = {}
if present then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if not keep[f] then extra[#extra + 1] = f end
  end
end
chunked('HDEL', KEYS[1], extra)
redis.call('PEXPIREAT', KEYS[1], str(m.ke))
redis.call('ZADD', KEYS[3], str(m.ke), ient)
redis.call('ZREM', KEYS[3], sid)  -- as the previous release named it
local idx = index_read()
redis.call('HSET', KEYS[2], ient, index_entry(m))
if held_entry[2] then redis.call('HDEL', KEYS[2], sid) end
idx_need(m.ke)
-- Recomputed rather than ZADD GT: a forced restore may move an expiry earlier.
client_refresh(nil)
idx_flush(idx)
return {'OK'}
""",
)

CREATE_CHECKPOINT = _script(
    "create_checkpoint",
    r"""
-- create_checkpoint (refreshes; the version stays).
-- ARGV[7] expected version or '', ARGV[8] '1' when a label follows in
--   ARGV[9], ARGV[10] max checkpoints, ARGV[11] max checkpoint bytes.
-- Returns {'OK', checkpoint_id, version, bytes, created_ms} | {'NOTFOUND'}
--   | {'CONFLICT', version} | {'CKLIMIT', 'count'|'bytes'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then
  if r[1] == 'REUSED' then return r end
  return {'OK', r[2], r[3], r[4], r.at}
end
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= m.v then return {'CONFLICT', m.v} end
local ck = checkpoint_kit()
local book = ck.open(m.extra[1])
local label = false
if ARGV[8] == '1' then label = ARGV[9] end
local names, values = ck.read(book)
local head, cap = ck.take(book, m, names, values, label, '0',
  tonumber(ARGV[10]), tonumber(ARGV[11]), '')
if not head then return {'CKLIMIT', cap} end
local moved = refresh(m)
local reply = {'OK', head.id, m.v, head.b, now}
local sets = ck.sets(book)
if ARGV[2] ~= '' then sets[#sets + 1] = 'q'; sets[#sets + 1] = replay_add(m.q, reply, 4) end
session_write(m, sets)
chunked('HDEL', KEYS[1], book.dels)
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)

LIST_CHECKPOINTS = _script(
    "list_checkpoints",
    r"""
-- list_checkpoints (no refresh).
-- ARGV: common only.
-- Returns {'OK', id, version, created_ms, bytes, automatic (0/1), label | false, ...}
--   newest first | {'NOTFOUND'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
idx_flush(idx)
local ck = checkpoint_kit()
local book = ck.open(m.extra[1])
local reply = {'OK'}
if #book.list == 0 then return reply end
local names = {}
for _, c in ipairs(book.list) do names[#names + 1] = 'kl:' .. c.id end
local labels = redis.call('HMGET', KEYS[1], unpack(names))
for i, c in ipairs(book.list) do
  reply[#reply + 1] = c.id; reply[#reply + 1] = c.v; reply[#reply + 1] = c.at
  reply[#reply + 1] = c.b; reply[#reply + 1] = c.auto; reply[#reply + 1] = labels[i]
end
return reply
""",
)

RESTORE_CHECKPOINT = _script(
    "restore_checkpoint",
    r"""
-- restore_checkpoint: the checkpoint's state and context back, in one
-- write, after an automatic checkpoint of what they replace (skipped at the
-- caps); the version goes up by one.
-- ARGV[7] checkpoint id, ARGV[8] expected version or '', ARGV[9] max
--   checkpoints, ARGV[10] max checkpoint bytes.
-- Returns {'OK', version, last_modified_ms, automatic taken (1/0),
--   's:key', json, ...} (the state after) | {'NOTFOUND'} | {'CKNOTFOUND'}
--   | {'CONFLICT', version} | {'REUSED'}. A retry within the replay window
--   answers with the state as it is then, and 0 for the automatic one.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh', 'k:' .. ARGV[7])
if not m then return early or {'NOTFOUND'} end
local function state_of(reply) return hmget_pairs(reply, prefixed('s:')) end
local r = replay_lookup(m.q)
if r then
  if r[1] == 'REUSED' then return r end
  return state_of({'OK', r[2], r.at, 0})
end
if ARGV[8] ~= '' and tonumber(ARGV[8]) ~= m.v then return {'CONFLICT', m.v} end
local blob = m.extra[2]
if not blob then return {'CKNOTFOUND'} end
local ck = checkpoint_kit()
local book = ck.open(m.extra[1])
local names, values = ck.read(book)
local took = ck.auto(book, m, names, values, 'restore_checkpoint', 9, ARGV[7])
local content = ck.apply(m, blob)
m.v, m.lm = m.v + 1, now
local moved = refresh(m)
local reply = {'OK', m.v, now, took}
local sets = ck.sets(book)
if ARGV[2] ~= '' then sets[#sets + 1] = 'q'; sets[#sets + 1] = replay_add(m.q, reply, 2) end
session_write(m, sets)
chunked('HDEL', KEYS[1], names)
chunked('HDEL', KEYS[1], book.dels)
chunked('HSET', KEYS[1], content)
index_write(m, moved, idx)
idx_flush(idx)
for i = 1, #content, 2 do
  if string.sub(content[i], 1, 2) == 's:' then
    reply[#reply + 1] = content[i]; reply[#reply + 1] = content[i + 1]
  end
end
return reply
""",
)

DELETE_CHECKPOINT = _script(
    "delete_checkpoint",
    r"""
-- delete_checkpoint (refreshes; the version stays).
-- ARGV[7] checkpoint id.
-- Returns {'OK', deleted (1/0)} | {'NOTFOUND'} | {'REUSED'}.
local idx = index_read()
local limited = rate_take(idx['!r'], ARGV[6])
if limited then return limited end
local m, early = load_meta('kh')
if not m then return early or {'NOTFOUND'} end
local r = replay_lookup(m.q)
if r then return r end
local ck = checkpoint_kit()
local book = ck.open(m.extra[1])
local deleted = 0
if ck.remove(book, ARGV[7]) then deleted = 1 end
local moved = refresh(m)
local reply = {'OK', deleted}
local sets = {}
if deleted == 1 then sets = ck.sets(book) end
if ARGV[2] ~= '' then sets[#sets + 1] = 'q'; sets[#sets + 1] = replay_add(m.q, reply, 2) end
session_write(m, sets)
chunked('HDEL', KEYS[1], book.dels)
index_write(m, moved, idx)
idx_flush(idx)
return reply
""",
)


PURGE_CLIENT = Script(
    "purge_client",
    r"""
-- purge_client (stui-sessions clients purge): one client's keys and index
-- members in its bucket, in one atomic step, so that no request of the
-- client runs between the removal of a session and of its index entry.
-- KEYS[1] the client index, KEYS[2] the bucket expiry zset, KEYS[3] the
-- bucket clients zset, KEYS[4] the previous release's rate-limit key
-- (rl:<h>), KEYS[5..] session hashes of the client.
-- ARGV[1] the client hash, ARGV[2..] the session ids of KEYS[5..], in order.
-- Returns {session hashes deleted, index keys deleted (the index, rl:<h>),
--   expiry zset members removed, clients zset members removed}.
local sessions = 0
for i = 5, #KEYS do sessions = sessions + redis.call('DEL', KEYS[i]) end
local index = redis.call('DEL', KEYS[1]) + redis.call('DEL', KEYS[4])
-- Each session's expiry member: its id's random part (layout.index_field),
-- or the full id (the previous release's).
local names = {}
for i = 2, #ARGV do
  names[#names + 1] = ARGV[i]; names[#names + 1] = string.sub(ARGV[i], #ARGV[1] + 2)
end
local members = 0
for s = 1, #names, 1000 do
  members = members + redis.call('ZREM', KEYS[2], unpack(names, s, math.min(s + 999, #names)))
end
return {sessions, index, members, redis.call('ZREM', KEYS[3], ARGV[1])}
""",
)

ALL_SCRIPTS: tuple[Script, ...] = (
    CREATE,
    RESTORE,
    UPDATE,
    CLOSE,
    INFO,
    LIST,
    RATE,
    STATS,
    SAVE_CONTEXT,
    LOAD_CONTEXT,
    SUMMARY,
    CLEAR_CONTEXT,
    RECORD_EVALUATION,
    REGISTER_OBJECT,
    RELEASE_OBJECT,
    RESTORE_BACKUP,
    CREATE_CHECKPOINT,
    LIST_CHECKPOINTS,
    RESTORE_CHECKPOINT,
    DELETE_CHECKPOINT,
    PURGE_CLIENT,
)
