"""Every Lua script the service runs, in one place.

Each script is one atomic check-and-write in one hash slot. Every key arrives
through KEYS (see service/keys.py); scripts never build key names. JSON stays
opaque here: values arrive already encoded by Python and are stored as they
are, so Redis' cjson (which turns [] into {}) never touches client data.

Session-scoped scripts share one calling convention:

    KEYS[1] session hash        KEYS[2] client index hash
    KEYS[3] bucket expiry zset  KEYS[4] bucket clients zset
    KEYS[5] replay record key (unused by read-only scripts)
    KEYS[6] the client's rate-limit buckets
    ARGV[1] client id the request names ('' = any)
    ARGV[2] request fingerprint ('' = no replay protection)
    ARGV[3] replay window (ms)
    ARGV[4] session id          ARGV[5] client hash
    ARGV[6] rate-limit spec 'rate,burst,create_rate,create_burst,is_create' ('' = off)
    ARGV[7..] script-specific, documented in each header

Rate limiting is the first thing every script does, so it costs no extra
round trip: a refused request returns {'RATELIMITED', ms until retry}.

Under maxmemory, Redis refuses a script's first write if that command may
grow memory, and never checks later ones (so as not to break atomicity).
Every script that grows memory therefore makes an HSET its first write:
a full Redis refuses it cleanly, before anything changed.

Every script returns an array whose first element is a status: 'OK', or one
of 'NOTFOUND', 'CONFLICT' (+ current version), 'TOOLARGE' (over the byte
cap), 'TOOMANYKEYS' (over the state key cap), 'LIMIT' (+ live count), 'FULL'
(+ registry size), 'REUSED' (request id reused with other parameters),
'COLLISION' (a new session id already exists).

Session hash fields: c client id, ca created (ms), lm last modified (ms),
to timeout (s), v version, a active (1/0), ci client_info JSON, sb state
bytes, xb context bytes (w, i, registry and history together), s:<key>
state entries, w workspace_context, wv its variable count, i
inspector_state, ih its history length, so its selected object, o:<id>
registry entries, rn registry size (absent: 0), e:<n> evaluation history
entries, en newest entry number (absent: 0), eo oldest (absent: 1), and cn,
the counters the previous release did not keep, in one field to spare a
hash field each: 'sn,cb,ob,hb,lv' (state key count, client_info bytes,
registry bytes, history bytes, and lv, the version at which a script of
this release counted them). The fields the previous release reads (sb, xb,
rn, en, eo) stay as they were, so that its fronts keep working during a
rolling upgrade. A write recounts every counter from the fields first when
lv is not the session's version: the session was last written by the
previous release (load_meta).

Size: a session costs sb + xb + cb + OVERHEAD x (sn + rn + history entries)
bytes (service/limits.py), keys counted as a reply writes them (klen). A
write that would make it cost more than the cap
is refused, unless it costs no more than before (shrinking always works).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from service import limits


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode("utf-8")).hexdigest())


_PRELUDE = r"""
local sid, chash = ARGV[4], ARGV[5]
local OVERHEAD = __ENTRY_OVERHEAD__  -- service.limits.ENTRY_OVERHEAD

-- One clock reading per script call, shared by the rate limiter and the
-- command (one TIME instead of two).
local clock
local function now_ms()
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end

-- Numbers handed to redis.call or stored in records go through here: Lua's
-- default number formatting (%.14g) would round large integers.
local function str(x)
  if type(x) == 'number' then return string.format('%d', x) end
  return x
end

local function split0(rec)
  local out, pos = {}, 1
  while true do
    local s = string.find(rec, '\0', pos, true)
    if not s then out[#out + 1] = string.sub(rec, pos); return out end
    out[#out + 1] = string.sub(rec, pos, s - 1)
    pos = s + 1
  end
end

-- nil for a new request; else the reply that the first execution sent.
local function replay_lookup()
  if ARGV[2] == '' then return nil end
  local rec = redis.call('GET', KEYS[5])
  if not rec then return nil end
  local parts = split0(rec)
  if parts[1] ~= ARGV[2] then return {'REUSED'} end
  parts[1] = 'OK'
  return parts
end

-- Keep reply[2..n] for the replay window: a small record, never a state copy.
local function replay_save(reply, n)
  if ARGV[2] == '' then return end
  local parts = {ARGV[2]}
  for i = 2, n do parts[#parts + 1] = str(reply[i]) end
  redis.call('SET', KEYS[5], table.concat(parts, '\0'), 'PX', ARGV[3])
end

-- A key's bytes as a reply writes it (service.limits.key_weight): JSON
-- escapes a control character in up to 6 bytes, and " and \\ in 2.
local function klen(k)
  if not string.find(k, '[%z\1-\31"\\]') then return #k end
  local _, ctrl = string.gsub(k, '[%z\1-\31]', '')
  local _, esc = string.gsub(k, '["\\]', '')
  return #k + 5 * ctrl + esc
end

-- Field names of the session hash that start with prefix.
local function prefixed(prefix)
  local out, n = {}, #prefix
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(f, 1, n) == prefix then out[#out + 1] = f end
  end
  return out
end

-- The counters from the fields themselves, for a session that a script of
-- this release did not write last: one of an earlier release (which keeps
-- sb and xb only, or fewer), during a rolling upgrade or after it.
local function recount(m)
  m.sb, m.sn, m.ob, m.rn, m.hb = 0, 0, 0, 0, 0
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
  m.xb = redis.call('HSTRLEN', KEYS[1], 'w') + redis.call('HSTRLEN', KEYS[1], 'i') + m.ob + m.hb
  m.recounted = true
end

-- The session's metadata, or nil when it is gone or another client's.
-- counted: a write that checks or keeps the size counters; they are
-- recounted first when a script of this release did not write them last
-- (lv, the version they were written at, is not the session's version).
local function load_meta(counted)
  local m = redis.call('HMGET', KEYS[1], 'c', 'ca', 'lm', 'to', 'v', 'a', 'sb', 'xb',
    'rn', 'en', 'eo', 'cn')
  if not m[1] then return nil end
  if ARGV[1] ~= '' and m[1] ~= ARGV[1] then return nil end
  local meta = {c = m[1], ca = tonumber(m[2]), lm = tonumber(m[3]), to = tonumber(m[4]),
    v = tonumber(m[5]), a = tonumber(m[6]), sb = tonumber(m[7]) or 0, xb = tonumber(m[8]) or 0,
    rn = tonumber(m[9]) or 0, en = tonumber(m[10]) or 0, eo = tonumber(m[11]) or 1,
    sn = 0, cb = 0, ob = 0, hb = 0}
  local lv
  if m[12] then
    local sn, cb, ob, hb, at = string.match(m[12], '^(%d+),(%d+),(%d+),(%d+),(%d+)$')
    meta.sn, meta.cb, meta.ob, meta.hb = tonumber(sn), tonumber(cb), tonumber(ob), tonumber(hb)
    lv = tonumber(at)
  end
  if counted and lv ~= meta.v then recount(meta) end
  return meta
end

local function cost(m)
  return m.sb + m.xb + m.cb + OVERHEAD * (m.sn + m.rn + m.en - m.eo + 1)
end

-- True when the write that turned `before` (a cost) into m may not go ahead.
local function too_large(m, before, cap)
  local after = cost(m)
  return after > tonumber(cap) and after > before
end

local function entry_expiry(packed)
  return tonumber(string.match(packed, '^(%d+)'))
end

local function index_put(m, exp, now)
  redis.call('HSET', KEYS[2], sid, table.concat(
    {str(exp), str(m.ca), str(m.lm), str(m.to), str(m.v), str(m.a)}, '|'))
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl < 0 or now + ttl < exp then redis.call('PEXPIREAT', KEYS[2], str(exp)) end
end

-- Sliding expiry: the session and every index entry move to now + timeout.
local function touch(m, now)
  local exp = now + m.to * 1000
  redis.call('PEXPIREAT', KEYS[1], str(exp))
  redis.call('ZADD', KEYS[3], str(exp), sid)
  redis.call('ZADD', KEYS[4], 'GT', str(exp), chash)
  index_put(m, exp, now)
  return exp
end

local COUNTERS = {'sb', 'xb', 'rn', 'en', 'eo'}

-- The version, the time, cn (sn, cb, ob, hb and lv, the version they are
-- counted at, in one field) and the other counters the write changed
-- (every one after a recount).
local function save_meta(m, ...)
  local sets = {'v', str(m.v), 'lm', str(m.lm),
    'cn', table.concat({str(m.sn), str(m.cb), str(m.ob), str(m.hb), str(m.v)}, ',')}
  local changed = m.recounted and COUNTERS or {...}
  for _, f in ipairs(changed) do sets[#sets + 1] = f; sets[#sets + 1] = str(m[f]) end
  redis.call('HSET', KEYS[1], unpack(sets))
end

-- After a session is gone: prune dead index entries and recompute the
-- client's latest expiry, which decides whether it counts as active.
local function client_refresh(now)
  local entries = redis.call('HGETALL', KEYS[2])
  local latest, live = 0, 0
  for i = 1, #entries, 2 do
    local exp = entry_expiry(entries[i + 1])
    if exp <= now then
      redis.call('HDEL', KEYS[2], entries[i])
    else
      live = live + 1
      if exp > latest then latest = exp end
    end
  end
  if latest > 0 then redis.call('ZADD', KEYS[4], str(latest), chash)
  else redis.call('ZREM', KEYS[4], chash) end
  return live
end

-- unpack() has a stack limit: send long argument lists in chunks.
local function chunked(cmd, key, items)
  for s = 1, #items, 1000 do
    redis.call(cmd, key, unpack(items, s, math.min(s + 999, #items)))
  end
end

local function append_fields(reply, want)
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if want(all[i]) then reply[#reply + 1] = all[i]; reply[#reply + 1] = all[i + 1] end
  end
  return reply
end

local function is_state(f) return string.sub(f, 1, 2) == 's:' end

-- Token buckets in one hash: g (every command) and c (create_session too).
-- Returns nil when the request may go on (and takes its tokens), else
-- {'RATELIMITED', ms until a token is back}. A refused request takes nothing.
local function rate_take(key, spec)
  if spec == '' then return nil end
  local rate, burst, crate, cburst, create =
    string.match(spec, '^([^,]+),([^,]+),([^,]+),([^,]+),([01])$')
  rate, burst, crate, cburst = tonumber(rate), tonumber(burst), tonumber(crate), tonumber(cburst)
  local now = now_ms()
  local b = redis.call('HMGET', key, 'g', 'gt', 'c', 'ct')
  local function level(tokens, at, r, cap)
    if not tokens then return cap end
    return math.min(cap, tonumber(tokens) + (now - tonumber(at)) * r / 1000)
  end
  -- The key may go only once both buckets are full again, whichever one
  -- this request used: an earlier expiry would hand back spent tokens.
  local ttl = 0
  if rate > 0 then ttl = math.ceil(burst * 1000 / rate) end
  if crate > 0 then ttl = math.max(ttl, math.ceil(cburst * 1000 / crate)) end
  local wait, sets = 0, {}
  if rate > 0 then
    local g = level(b[1], b[2], rate, burst)
    if g < 1 then wait = math.ceil((1 - g) * 1000 / rate) end
    sets[#sets + 1] = 'g'; sets[#sets + 1] = string.format('%.4f', g - 1)
    sets[#sets + 1] = 'gt'; sets[#sets + 1] = str(now)
  end
  if create == '1' and crate > 0 then
    local c = level(b[3], b[4], crate, cburst)
    if c < 1 then wait = math.max(wait, math.ceil((1 - c) * 1000 / crate)) end
    sets[#sets + 1] = 'c'; sets[#sets + 1] = string.format('%.4f', c - 1)
    sets[#sets + 1] = 'ct'; sets[#sets + 1] = str(now)
  end
  if wait > 0 then return {'RATELIMITED', wait} end
  if #sets > 0 then
    redis.call('HSET', key, unpack(sets))
    -- A full bucket is the same as no bucket: let the key go once it refills.
    redis.call('PEXPIRE', key, str(ttl + 1000))
  end
  return nil
end
"""


def _script(name: str, body: str) -> Script:
    prelude = _PRELUDE.replace("__ENTRY_OVERHEAD__", str(limits.ENTRY_OVERHEAD))
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
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local now = now_ms()
local entries = redis.call('HGETALL', KEYS[2])
local live, dead = 0, {}
for i = 1, #entries, 2 do
  if entry_expiry(entries[i + 1]) <= now then dead[#dead + 1] = entries[i]
  else live = live + 1 end
end
if live >= tonumber(ARGV[9]) then return {'LIMIT', live} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'COLLISION'} end
local m = {c = ARGV[1], ca = now, lm = now, to = tonumber(ARGV[7]), v = 1, a = 1, sb = 0, xb = 0}
-- First write: refused cleanly by a full Redis (see the module docstring).
redis.call('HSET', KEYS[1], 'c', m.c, 'ca', str(now), 'lm', str(now), 'to', str(m.to),
  'v', '1', 'a', '1', 'sb', '0', 'xb', '0', 'cn', '0,' .. str(#ARGV[8]) .. ',0,0,1')
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'ci', ARGV[8]) end
chunked('HDEL', KEYS[2], dead)
-- Amortised pruning of the bucket indexes; counting never depends on it.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', str(now))
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', str(now))
local exp = touch(m, now)
local reply = {'OK', sid, now, exp}
replay_save(reply, 4)
return reply
""",
)

RESTORE = _script(
    "restore",
    r"""
-- restore_session: reactivate, refresh, return everything.
-- ARGV: common only.
-- Returns {'OK', now_ms, expires_ms, field1, value1, ...} (the whole hash) | {'NOTFOUND'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local m = load_meta()
if not m then return {'NOTFOUND'} end
local now = now_ms()
m.a = 1
redis.call('HSET', KEYS[1], 'a', '1')
local exp = touch(m, now)
local reply = {'OK', now, exp}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do reply[#reply + 1] = all[i] end
return reply
""",
)

UPDATE = _script(
    "update",
    r"""
-- update_session_state: top-level merge (or replace) of the state.
-- ARGV[7] expected version or '', ARGV[8] '1' to replace the whole state,
--   ARGV[9] max session bytes, ARGV[10] max state keys,
--   ARGV[11..] key, JSON value pairs ('' removes the key), each key once.
-- Returns {'OK', version, last_modified_ms, 's:key', json, ...} | {'NOTFOUND'}
--   | {'CONFLICT', version} | {'TOOLARGE'} | {'TOOMANYKEYS'} | {'REUSED'}.
--   The fields are the state keys the update did not name (none after a
--   replace): the caller has the others, so they are not read back.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local replace = ARGV[8] == '1'
local function untouched(reply, sn)
  if replace then return reply end
  local named, kept = {}, 0
  for i = 11, #ARGV, 2 do
    named['s:' .. ARGV[i]] = true
    if ARGV[i + 1] ~= '' then kept = kept + 1 end
  end
  -- Every key the state holds was named (and so is in the caller's hands).
  if sn and sn == kept then return reply end
  local want = {}
  for _, f in ipairs(prefixed('s:')) do
    if not named[f] then want[#want + 1] = f end
  end
  for s = 1, #want, 1000 do
    local last = math.min(s + 999, #want)
    local values = redis.call('HMGET', KEYS[1], unpack(want, s, last))
    for j = 1, last - s + 1 do
      reply[#reply + 1] = want[s + j - 1]; reply[#reply + 1] = values[j]
    end
  end
  return reply
end
local r = replay_lookup()
if r then return untouched(r) end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= m.v then return {'CONFLICT', m.v} end
local before, keys_before = cost(m), m.sn
local old = {}
if replace then
  m.sb, m.sn = 0, 0
  old = prefixed('s:')
end
for i = 11, #ARGV, 2 do
  if not replace then
    local n = redis.call('HSTRLEN', KEYS[1], 's:' .. ARGV[i])
    if n > 0 then m.sb, m.sn = math.max(0, m.sb - klen(ARGV[i]) - n), m.sn - 1 end
  end
  if ARGV[i + 1] ~= '' then m.sb, m.sn = m.sb + klen(ARGV[i]) + #ARGV[i + 1], m.sn + 1 end
end
if m.sn > tonumber(ARGV[10]) and m.sn > keys_before then return {'TOOMANYKEYS'} end
if too_large(m, before, ARGV[9]) then return {'TOOLARGE'} end
local now = now_ms()
m.v, m.lm = m.v + 1, now
save_meta(m, 'sb')  -- first write: refused cleanly by a full Redis
chunked('HDEL', KEYS[1], old)
local sets, dels = {}, {}
for i = 11, #ARGV, 2 do
  if ARGV[i + 1] == '' then dels[#dels + 1] = 's:' .. ARGV[i]
  else sets[#sets + 1] = 's:' .. ARGV[i]; sets[#sets + 1] = ARGV[i + 1] end
end
chunked('HDEL', KEYS[1], dels)
chunked('HSET', KEYS[1], sets)
touch(m, now)
local reply = {'OK', m.v, now}
replay_save(reply, 3)
return untouched(reply, m.sn)
""",
)

CLOSE = _script(
    "close",
    r"""
-- close_session.
-- ARGV[7] '1' to keep the session (inactive, restorable) until it expires.
-- Returns {'OK', state_saved (1/0)} | {'NOTFOUND'} | {'REUSED'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta()
if not m then return {'NOTFOUND'} end
local now = now_ms()
local saved = 0
if ARGV[7] == '1' then
  m.a = 0
  redis.call('HSET', KEYS[1], 'a', '0')
  index_put(m, now + redis.call('PTTL', KEYS[1]), now)
  saved = 1
else
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], sid)
  redis.call('ZREM', KEYS[3], sid)
  client_refresh(now)
end
local reply = {'OK', saved}
replay_save(reply, 2)
return reply
""",
)

INFO = _script(
    "info",
    r"""
-- get_session_info (no refresh).
-- ARGV: common only.
-- Returns {'OK', client_id, created_ms, modified_ms, timeout, version, active,
--   expires_ms, now_ms, client_info JSON | false} | {'NOTFOUND'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local m = load_meta()
if not m then return {'NOTFOUND'} end
local now = now_ms()
return {'OK', m.c, m.ca, m.lm, m.to, m.v, m.a, now + redis.call('PTTL', KEYS[1]), now,
  redis.call('HGET', KEYS[1], 'ci')}
""",
)

LIST = _script(
    "list",
    r"""
-- list_client_sessions (no refresh).
-- KEYS[1] client index hash, KEYS[2] the client's rate-limit buckets.
-- ARGV[1] rate-limit spec ('' = off).
-- Returns {'OK', now_ms, session_id, 'expires|created|modified|timeout|version|active', ...}
--   | {'RATELIMITED', ms}.
local limited = rate_take(KEYS[2], ARGV[1])
if limited then return limited end
local now = now_ms()
local out = {'OK', now}
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  if entry_expiry(entries[i + 1]) <= now then redis.call('HDEL', KEYS[1], entries[i])
  else out[#out + 1] = entries[i]; out[#out + 1] = entries[i + 1] end
end
return out
""",
)

RATE = _script(
    "rate",
    r"""
-- The rate limit alone, for commands that otherwise never reach Redis
-- (ping, describe) or read only bucket indexes (statistics) but name a client.
-- KEYS[1] the client's rate-limit buckets. ARGV[1] rate-limit spec.
-- Returns {'OK'} | {'RATELIMITED', ms}.
return rate_take(KEYS[1], ARGV[1]) or {'OK'}
""",
)

STATS = Script(
    "stats",
    r"""
-- get_session_statistics, one bucket: exact live counts, O(log n), no SCAN.
-- KEYS[1] bucket expiry zset, KEYS[2] bucket clients zset. ARGV: none.
-- Returns {live_sessions, active_clients}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
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
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= m.v then return {'CONFLICT', m.v} end
local before = cost(m)
local xb = m.xb
local w, ins = ARGV[9], ARGV[11]
if w ~= '-' then xb = xb - redis.call('HSTRLEN', KEYS[1], 'w') + #w end
if ins ~= '-' then xb = xb - redis.call('HSTRLEN', KEYS[1], 'i') + #ins end
local pos = 14
local nreg = tonumber(ARGV[pos])
local reg_at = pos + 1
local old_reg, old_hist = {}, {}
if nreg >= 0 then
  old_reg = prefixed('o:')
  local ob = 0
  for k = 0, nreg - 1 do ob = ob + klen(ARGV[reg_at + 2 * k]) + #ARGV[reg_at + 2 * k + 1] end
  xb, m.ob = xb - m.ob + ob, ob
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
  xb, m.hb = xb - m.hb + hb, hb
end
m.xb = xb
if nreg >= 0 then m.rn = nreg end
if nhist >= 0 then m.eo = m.en + 1; m.en = m.en + nhist end
if too_large(m, before, ARGV[8]) then return {'TOOLARGE'} end
local now = now_ms()
m.v, m.lm = m.v + 1, now
save_meta(m, 'xb', 'rn', 'en', 'eo')  -- first write: refused cleanly by a full Redis
if w == '' then redis.call('HDEL', KEYS[1], 'w', 'wv')
elseif w ~= '-' then redis.call('HSET', KEYS[1], 'w', w, 'wv', ARGV[10]) end
if ins == '' then redis.call('HDEL', KEYS[1], 'i', 'ih', 'so')
elseif ins ~= '-' then redis.call('HSET', KEYS[1], 'i', ins, 'ih', ARGV[12], 'so', ARGV[13]) end
if nreg >= 0 then
  chunked('HDEL', KEYS[1], old_reg)
  local sets = {}
  for k = 0, nreg - 1 do
    sets[#sets + 1] = 'o:' .. ARGV[reg_at + 2 * k]
    sets[#sets + 1] = ARGV[reg_at + 2 * k + 1]
  end
  chunked('HSET', KEYS[1], sets)
end
if nhist >= 0 then
  chunked('HDEL', KEYS[1], old_hist)
  local sets = {}
  for k = 0, nhist - 1 do
    sets[#sets + 1] = 'e:' .. str(m.eo + k)
    sets[#sets + 1] = ARGV[hist_at + k]
  end
  chunked('HSET', KEYS[1], sets)
end
touch(m, now)
local reply = {'OK', m.v, now, xb}
replay_save(reply, 4)
return reply
""",
)

LOAD_CONTEXT = _script(
    "load_context",
    r"""
-- load_context (refreshes).
-- ARGV: common only.
-- Returns {'OK', field, value, ...} for the fields w, i, o:<id> and e:<n> | {'NOTFOUND'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local m = load_meta()
if not m then return {'NOTFOUND'} end
touch(m, now_ms())
return append_fields({'OK'}, function(f)
  local p = string.sub(f, 1, 2)
  return f == 'w' or f == 'i' or p == 'o:' or p == 'e:'
end)
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
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local m = load_meta()
if not m then return {'NOTFOUND'} end
local s = redis.call('HMGET', KEYS[1], 'wv', 'ih', 'so', 'rn', 'en', 'eo')
return {'OK', tonumber(s[1]) or 0, tonumber(s[2]) or 0, s[3], tonumber(s[4]) or 0,
  tonumber(s[5]) or 0, tonumber(s[6]) or 1, m.xb, m.lm}
""",
)

CLEAR_CONTEXT = _script(
    "clear_context",
    r"""
-- clear_context.
-- ARGV[7] the parts to clear, as letters: w workspace, i inspector, o registry, e history.
-- Returns {'OK', version} | {'NOTFOUND'} | {'REUSED'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
local parts = ARGV[7]
local xb = m.xb
local del = {}
local function has(letter) return string.find(parts, letter, 1, true) ~= nil end
if has('w') then
  xb = xb - redis.call('HSTRLEN', KEYS[1], 'w'); del[#del + 1] = 'w'; del[#del + 1] = 'wv'
end
if has('i') then
  xb = xb - redis.call('HSTRLEN', KEYS[1], 'i')
  del[#del + 1] = 'i'; del[#del + 1] = 'ih'; del[#del + 1] = 'so'
end
if has('o') then
  for _, f in ipairs(prefixed('o:')) do del[#del + 1] = f end
  xb, m.ob, m.rn = xb - m.ob, 0, 0
end
if has('e') then
  for n = m.eo, m.en do del[#del + 1] = 'e:' .. str(n) end
  xb, m.hb, m.eo = xb - m.hb, 0, m.en + 1
end
chunked('HDEL', KEYS[1], del)
local now = now_ms()
m.v, m.lm, m.xb = m.v + 1, now, xb
save_meta(m, 'xb', 'rn', 'eo')
touch(m, now)
local reply = {'OK', m.v}
replay_save(reply, 2)
return reply
""",
)

RECORD_EVALUATION = _script(
    "record_evaluation",
    r"""
-- record_evaluation: append to the history, keeping the newest entries.
-- ARGV[7] entry JSON, ARGV[8] history limit, ARGV[9] max session bytes.
-- Returns {'OK', evaluation_count, version} | {'NOTFOUND'} | {'TOOLARGE'} | {'REUSED'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
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
m.en, m.eo, m.xb, m.hb = en, eo, m.xb + added, m.hb + added
if too_large(m, before, ARGV[9]) then return {'TOOLARGE'} end
redis.call('HSET', KEYS[1], 'e:' .. str(en), ARGV[7])
chunked('HDEL', KEYS[1], evict)
local now = now_ms()
m.v, m.lm = m.v + 1, now
save_meta(m, 'xb', 'en', 'eo')
touch(m, now)
local reply = {'OK', en - eo + 1, m.v}
replay_save(reply, 3)
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
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
local f = 'o:' .. ARGV[7]
local old = redis.call('HSTRLEN', KEYS[1], f)
if old == 0 and m.rn >= tonumber(ARGV[9]) then return {'FULL', m.rn} end
local before = cost(m)
local added = #ARGV[8]
if old == 0 then added, m.rn = added + klen(ARGV[7]), m.rn + 1 else added = added - old end
m.xb, m.ob = m.xb + added, m.ob + added
if too_large(m, before, ARGV[10]) then return {'TOOLARGE'} end
redis.call('HSET', KEYS[1], f, ARGV[8])
local now = now_ms()
m.v, m.lm = m.v + 1, now
save_meta(m, 'xb', 'rn')
touch(m, now)
local reply = {'OK', m.rn, m.v}
replay_save(reply, 3)
return reply
""",
)

RELEASE_OBJECT = _script(
    "release_object",
    r"""
-- release_object: drop one registry entry (refreshes even when there was none).
-- ARGV[7] object id.
-- Returns {'OK', released (1/0), registry_size, version} | {'NOTFOUND'} | {'REUSED'}.
local limited = rate_take(KEYS[6], ARGV[6])
if limited then return limited end
local r = replay_lookup()
if r then return r end
local m = load_meta(true)
if not m then return {'NOTFOUND'} end
local f = 'o:' .. ARGV[7]
local old = redis.call('HSTRLEN', KEYS[1], f)
local now = now_ms()
local released = 0
if old > 0 then
  released = 1
  redis.call('HDEL', KEYS[1], f)
  local gone = klen(ARGV[7]) + old
  m.v, m.lm, m.rn = m.v + 1, now, m.rn - 1
  m.xb, m.ob = math.max(0, m.xb - gone), math.max(0, m.ob - gone)
  save_meta(m, 'xb', 'rn')
end
touch(m, now)
local reply = {'OK', released, m.rn, m.v}
replay_save(reply, 4)
return reply
""",
)

RESTORE_BACKUP = _script(
    "restore_backup",
    r"""
-- restore_backup: put one session from a backup file back (stui-sessions restore),
-- with its remaining TTL, and rebuild its three index entries as touch() does.
-- The fields were validated and their sizes recomputed by service/restore.py;
-- this script adds what only Redis can check: the clock and the client's
-- live sessions.
-- KEYS[1..4] as every session script (no replay, no rate limit). ARGV[1..3], ARGV[6]: ''.
-- ARGV[7] absolute expiry (ms), ARGV[8] '1' to overwrite a newer or equal version,
--   ARGV[9] max live sessions per client,
--   ARGV[10..] the session hash as field, value pairs (c, ca, lm, to, v, a among them).
-- The expiry is brought back to now + timeout when it lies beyond it (a
-- backup read on a node whose clock was ahead).
-- Returns {'OK'} | {'EXPIRED'} | {'NEWER', stored version} | {'LIMIT', live}.
local now = now_ms()
local exp = tonumber(ARGV[7])
if exp <= now then return {'EXPIRED'} end
local m, sets, keep = {}, {}, {}
for i = 10, #ARGV, 2 do
  local f = ARGV[i]
  sets[#sets + 1] = f; sets[#sets + 1] = ARGV[i + 1]; keep[f] = true
  if f == 'ca' or f == 'lm' or f == 'to' or f == 'v' or f == 'a' then
    m[f] = tonumber(ARGV[i + 1])
  end
end
local stored = tonumber(redis.call('HGET', KEYS[1], 'v'))
if stored and ARGV[8] ~= '1' and stored >= m.v then return {'NEWER', stored} end
exp = math.min(exp, now + m.to * 1000)
local entry = redis.call('HGET', KEYS[2], sid)
if not (stored and entry and entry_expiry(entry) > now) then
  -- A session new to the client: it must fit under the client's limit.
  local live = 0
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 2, #entries, 2 do
    if entry_expiry(entries[i]) > now then live = live + 1 end
  end
  if live >= tonumber(ARGV[9]) then return {'LIMIT', live} end
end
-- First write: refused cleanly by a full Redis (see the module docstring).
chunked('HSET', KEYS[1], sets)
local extra = {}
if stored then
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if not keep[f] then extra[#extra + 1] = f end
  end
end
chunked('HDEL', KEYS[1], extra)
redis.call('PEXPIREAT', KEYS[1], str(exp))
redis.call('ZADD', KEYS[3], str(exp), sid)
index_put(m, exp, now)
-- Recomputed rather than ZADD GT: a forced restore may move an expiry earlier.
client_refresh(now)
return {'OK'}
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
)
