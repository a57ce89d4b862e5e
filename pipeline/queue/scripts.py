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
# bytes_out field, dead field, dead-from-this-stream field.
DEAD = (
    OWNED
    + f"""
if not owned(ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[4], '{K.FIELD_STAGE}', ARGV[5],
  '{K.FIELD_REASON}', ARGV[6], '{K.FIELD_DELIVERIES}', ARGV[7], '{K.FIELD_DATA}', ARGV[8])
ack_del(ARGV[3])
redis.call('HINCRBY', KEYS[3], ARGV[9], #ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[10], 1)
redis.call('HINCRBY', KEYS[3], ARGV[11], 1)
return 1
"""
)

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
