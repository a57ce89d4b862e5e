"""The Lua scripts of the lease layer (`pipeline.queue.lease`), one atomic state change each.

Every script that changes an entry first checks, with XPENDING, that the calling consumer still owns
it: a consumer whose lease was taken over can neither publish, acknowledge, renew nor dead-letter it.
Acknowledged entries are deleted in the same script, so streams hold only waiting or in-flight work.
"""

from __future__ import annotations

from pipeline.queue import schema as K

# Shared Lua prologue: is entry ARGV-sid pending for this consumer?
OWNED = """
local function owned(stream, group, consumer, sid)
  local p = redis.call('XPENDING', stream, group, sid, sid, 1, consumer)
  return #p == 1
end
"""

# KEYS: src, dst, stats. ARGV: group, consumer, bytes_out_field, bytes_in_field, then per-entry
# counter names (one per extra counter), n_counters, then 5-tuples (sid, rid, payload, src_bytes, ...).
HANDOFF = (
    OWNED
    + f"""
local group, consumer, f_out, f_in, f_moved, f_pos = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local res, moved, b_in, b_out, pos = {{}}, 0, 0, 0, 0
local i = 7
while i <= #ARGV do
  local sid, rid, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if owned(KEYS[1], group, consumer, sid) then
    redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', rid, '{K.FIELD_DATA}', payload)
    redis.call('XACK', KEYS[1], group, sid)
    redis.call('XDEL', KEYS[1], sid)
    moved = moved + 1
    b_in = b_in + #payload
    b_out = b_out + tonumber(ARGV[i + 3])
    pos = pos + tonumber(ARGV[i + 4])
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
  i = i + 5
end
if moved > 0 then
  redis.call('HINCRBY', KEYS[3], f_moved, moved)
  redis.call('HINCRBY', KEYS[3], f_pos, pos)
  redis.call('HINCRBY', KEYS[3], f_in, b_in)
  redis.call('HINCRBY', KEYS[3], f_out, b_out)
end
return res
"""
)

# KEYS: src, stats. ARGV: group, consumer, bytes_out_field, then pairs (sid, src_bytes).
ACK = (
    OWNED
    + """
local group, consumer, f_out = ARGV[1], ARGV[2], ARGV[3]
local res, b_out = {}, 0
for i = 4, #ARGV, 2 do
  local sid = ARGV[i]
  if owned(KEYS[1], group, consumer, sid) then
    redis.call('XACK', KEYS[1], group, sid)
    redis.call('XDEL', KEYS[1], sid)
    b_out = b_out + tonumber(ARGV[i + 1])
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
if b_out > 0 then redis.call('HINCRBY', KEYS[2], f_out, b_out) end
return res
"""
)

# KEYS: src, dead, stats. ARGV: group, consumer, sid, rid, stage, reason, deliveries, payload,
# bytes_out_field, dead_field, dead_stage_field.
DEAD = (
    OWNED
    + f"""
local group, consumer, sid = ARGV[1], ARGV[2], ARGV[3]
if not owned(KEYS[1], group, consumer, sid) then return 0 end
redis.call('XADD', KEYS[2], '*', '{K.FIELD_ID}', ARGV[4], '{K.FIELD_STAGE}', ARGV[5],
  '{K.FIELD_REASON}', ARGV[6], '{K.FIELD_DELIVERIES}', ARGV[7], '{K.FIELD_DATA}', ARGV[8])
redis.call('XACK', KEYS[1], group, sid)
redis.call('XDEL', KEYS[1], sid)
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
local group, consumer = ARGV[1], ARGV[2]
local res = {}
for i = 3, #ARGV do
  if owned(KEYS[1], group, consumer, ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"""
)

# KEYS: src. ARGV: group, consumer, idle_ms, then pairs (sid, retrycount). Makes owned entries
# reclaimable at once by any consumer, without counting this hand-back as a delivery.
RELEASE = (
    OWNED
    + """
local group, consumer, idle = ARGV[1], ARGV[2], ARGV[3]
local res = {}
for i = 4, #ARGV, 2 do
  if owned(KEYS[1], group, consumer, ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], group, consumer, 0, ARGV[i],
      'IDLE', idle, 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    res[#res + 1] = 1
  else
    res[#res + 1] = 0
  end
end
return res
"""
)
