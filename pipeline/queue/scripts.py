"""The Lua scripts of the lease layer (`pipeline.queue.lease`), one atomic state change each.

Every script that changes an entry first checks, with XPENDING, that the calling consumer still owns
it: a consumer whose lease was taken over can neither publish, acknowledge, renew nor dead-letter it.
Acknowledged entries are deleted in the same script, so streams hold only waiting or in-flight work.
"""

from __future__ import annotations

from pipeline.queue import schema as K

# Shared Lua prologue. ARGV[1], ARGV[2] are the group and the consumer in every script below.
# owned(sid): is entry `sid` of KEYS[1] pending for this consumer?
# each_owned(first, step, act): act(i) for every tuple ARGV[i..i+step-1] (i = first, first+step, ...)
# whose sid ARGV[i] this consumer owns; returns one flag per tuple (1 done, 0 not owned).
OWNED = """
local function owned(sid)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], sid, sid, 1, ARGV[2])
  return #p == 1
end
local function each_owned(first, step, act)
  local res = {}
  for i = first, #ARGV, step do
    if owned(ARGV[i]) then
      act(i)
      res[#res + 1] = 1
    else
      res[#res + 1] = 0
    end
  end
  return res
end
local function ack_del(sid)
  redis.call('XACK', KEYS[1], ARGV[1], sid)
  redis.call('XDEL', KEYS[1], sid)
end
"""

# KEYS: src, dst, stats. ARGV: group, consumer, src bytes_out field, dst bytes_in field, moved field,
# positions field, then 5-tuples (sid, rid, payload, src_bytes, positions).
HANDOFF = (
    OWNED
    + f"""
local moved, b_in, b_out, pos = 0, 0, 0, 0
local res = each_owned(7, 5, function(i)
  redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[i + 1], '{K.FIELD_DATA}', ARGV[i + 2])
  ack_del(ARGV[i])
  moved = moved + 1
  b_in = b_in + #ARGV[i + 2]
  b_out = b_out + tonumber(ARGV[i + 3])
  pos = pos + tonumber(ARGV[i + 4])
end)
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[5], moved)
  redis.call('HINCRBY', KEYS[3], ARGV[6], pos)
  redis.call('HINCRBY', KEYS[3], ARGV[4], b_in)
  redis.call('HINCRBY', KEYS[3], ARGV[3], b_out)
end
return res
"""
)

# KEYS: rollouts, stats[, batch marker]. ARGV: produced field, bytes_in field, marker TTL ms, then pairs
# (rid, payload). A producer's batch: its entries, its counters and its marker, all or nothing.
ADD = f"""
local ids, b = {{}}, 0
for i = 4, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', '{K.FIELD_ID}', ARGV[i], '{K.FIELD_DATA}', ARGV[i + 1])
  b = b + #ARGV[i + 1]
end
redis.call('HINCRBY', KEYS[2], ARGV[1], #ids)
redis.call('HINCRBY', KEYS[2], ARGV[2], b)
if #KEYS > 2 then redis.call('SET', KEYS[3], 1, 'PX', ARGV[3]) end
return ids
"""

# KEYS: src, stats. ARGV: group, consumer, bytes_out field, then pairs (sid, src_bytes).
ACK = (
    OWNED
    + """
local b_out = 0
local res = each_owned(4, 2, function(i)
  ack_del(ARGV[i])
  b_out = b_out + tonumber(ARGV[i + 1])
end)
if b_out > 0 then redis.call('HINCRBY', KEYS[2], ARGV[3], b_out) end
return res
"""
)

# KEYS: src, dead, stats. ARGV: group, consumer, sid, rid, stage, reason, deliveries, payload,
# bytes_out field, dead field, dead-from-this-stream field, max dead entries, max payload bytes,
# trimmed field, cut field. A payload above the limit is cut (field cut_from: its length); the dead
# stream is trimmed (approximately) to its entry limit and what went is counted.
DEAD = (
    OWNED
    + f"""
if not owned(ARGV[3]) then return 0 end
local payload, max_payload = ARGV[8], tonumber(ARGV[13])
local entry = {{KEYS[2], '*', '{K.FIELD_ID}', ARGV[4], '{K.FIELD_STAGE}', ARGV[5],
  '{K.FIELD_REASON}', ARGV[6], '{K.FIELD_DELIVERIES}', ARGV[7]}}
if #payload > max_payload then
  entry[#entry + 1] = '{K.FIELD_CUT_FROM}'
  entry[#entry + 1] = #payload
  payload = string.sub(payload, 1, max_payload)
  redis.call('HINCRBY', KEYS[3], ARGV[15], 1)
end
entry[#entry + 1] = '{K.FIELD_DATA}'
entry[#entry + 1] = payload
redis.call('XADD', unpack(entry))
ack_del(ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[9], #ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[10], 1)
redis.call('HINCRBY', KEYS[3], ARGV[11], 1)
local trimmed = redis.call('XTRIM', KEYS[2], 'MAXLEN', '~', ARGV[12])
if trimmed > 0 then redis.call('HINCRBY', KEYS[3], ARGV[14], trimmed) end
return 1
"""
)

# KEYS: ready, journal, stats. ARGV: group, consumer, step, ready bytes_out field, journal bytes_in
# field, then 4-tuples (sid, rid, rollout payload, ready payload bytes). A trained sample leaves ready
# (acknowledged, deleted) and its compact rollout enters the journal with the step, in one change.
JOURNAL = (
    OWNED
    + f"""
local b_out, b_in = 0, 0
local res = each_owned(6, 4, function(i)
  redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[i + 1], '{K.FIELD_STEP}', ARGV[3],
    '{K.FIELD_CONSUMER}', ARGV[2], '{K.FIELD_DATA}', ARGV[i + 2])
  ack_del(ARGV[i])
  b_out = b_out + tonumber(ARGV[i + 3])
  b_in = b_in + #ARGV[i + 2]
end)
if b_out > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[4], b_out)
  redis.call('HINCRBY', KEYS[3], ARGV[5], b_in)
end
return res
"""
)

# KEYS: ready, stats. ARGV: group, bytes_out field, then pairs (sid, payload bytes). Acknowledges and
# deletes entries a checkpoint includes, whichever consumer holds them (a resume, before any reads).
SETTLE = """
local n, b = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i])
    n = n + 1
    b = b + tonumber(ARGV[i + 1])
  end
end
if b > 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], b) end
return n
"""

# KEYS: journal, stats. ARGV: last id to delete (inclusive), count, bytes_out field. Deletes up to
# `count` of the oldest entries up to that id; returns how many (0: nothing left to trim).
TRIM_JOURNAL = f"""
local es = redis.call('XRANGE', KEYS[1], '-', ARGV[1], 'COUNT', tonumber(ARGV[2]))
local b = 0
for _, e in ipairs(es) do
  local f = e[2]
  for j = 1, #f, 2 do
    if f[j] == '{K.FIELD_DATA}' then b = b + #f[j + 1] end
  end
  redis.call('XDEL', KEYS[1], e[1])
end
if b > 0 then redis.call('HINCRBY', KEYS[2], ARGV[3], b) end
return #es
"""

# KEYS: journal, rollouts, stats. ARGV: journal bytes_out field, rollouts bytes_in field, requeued
# field, dropped field, then 4-tuples (journal sid, rid, payload or "" to drop, journal bytes). Each
# journal entry still there is deleted and, with a payload, added to rollouts: at most once, however
# often a resume runs. Returns {requeued, dropped}.
REQUEUE = f"""
local moved, dropped, b_out, b_in = 0, 0, 0, 0
for i = 5, #ARGV, 4 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    b_out = b_out + tonumber(ARGV[i + 3])
    if #ARGV[i + 2] > 0 then
      redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[i + 1], '{K.FIELD_DATA}', ARGV[i + 2])
      moved = moved + 1
      b_in = b_in + #ARGV[i + 2]
    else
      dropped = dropped + 1
    end
  end
end
if b_out > 0 then redis.call('HINCRBY', KEYS[3], ARGV[1], b_out) end
if b_in > 0 then redis.call('HINCRBY', KEYS[3], ARGV[2], b_in) end
if moved > 0 then redis.call('HINCRBY', KEYS[3], ARGV[3], moved) end
if dropped > 0 then redis.call('HINCRBY', KEYS[3], ARGV[4], dropped) end
return {{moved, dropped}}
"""

# KEYS: heartbeat. ARGV: our instance id, ttl_ms, the instance we may replace ("" for none, "*" for
# any), then field, value pairs. Writes our heartbeat unless another instance holds the name; then
# returns that instance's fields (and writes nothing).
BEAT = f"""
local cur = redis.call('HGET', KEYS[1], '{K.HB.INSTANCE}')
if cur and cur ~= ARGV[1] and cur ~= ARGV[3] and ARGV[3] ~= '*' then
  return redis.call('HGETALL', KEYS[1])
end
redis.call('HSET', KEYS[1], '{K.HB.INSTANCE}', ARGV[1], unpack(ARGV, 4))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {{}}
"""

# KEYS: src. ARGV: group, consumer, sids... Resets the idle time of entries this consumer still owns.
RENEW = (
    OWNED
    + """
return each_owned(3, 1, function(i)
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
end)
"""
)

# KEYS: src. ARGV: group, consumer, idle_ms, then pairs (sid, retrycount). Makes owned entries
# reclaimable at once by any consumer, without counting this hand-back as a delivery.
RELEASE = (
    OWNED
    + """
return each_owned(4, 2, function(i)
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
    'IDLE', ARGV[3], 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
end)
"""
)
