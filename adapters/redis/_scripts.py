"""The Lua scripts behind fetch, nack and hand-back (each one round trip, atomic on the server).

Redis 7.0 has no XNACK. An entry given back (``nack(requeue=True)`` or a consumer's close) is
moved with ``XCLAIM ... RETRYCOUNT n JUSTID`` to a parking consumer of the group (``PARKED``),
which nobody reads from; every member's fetch claims the parked entries first, so they come
back at once, with the delivery counter saying how many attempts were made. Entries of a dead
consumer are taken over by the same fetch once they have been idle for the lease; a live
consumer keeps the entries it holds by renewing them (``EXTEND``) well within the lease.

Delayed messages (``DELAY``) wait in a sorted set per topic, scored by their due time in
milliseconds of the server's clock, and ``MOVE`` appends the due ones to the stream.
"""

from __future__ import annotations

__all__ = ["DELAY", "EXTEND", "FETCH", "HANDBACK", "MOVE", "NACK", "PARKED"]

PARKED = "mqkit:handed-back"
"""The consumer name that holds handed-back entries until a member claims them."""

# KEYS[1] stream
# ARGV group, me, parked, n, scan (0/1), lease_ms, cursor
# -> {claimed entries, their delivery counts, XREADGROUP reply or false, next cursor}
FETCH = """
local key = KEYS[1]
local group, me, parked = ARGV[1], ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])
local cursor = ARGV[7]
local entries, counts = {}, {}
local function claim(ids, count_of, min_idle)
  if #ids == 0 then return end
  local got = redis.call('XCLAIM', key, group, me, min_idle, unpack(ids))
  for _, e in ipairs(got) do
    entries[#entries + 1] = e
    counts[#counts + 1] = count_of[e[1]] + 1
  end
end
local room = math.min(n, 1000)
local parked_list = redis.call('XPENDING', key, group, '-', '+', room, parked)
if #parked_list > 0 then
  local ids, count_of = {}, {}
  for i, p in ipairs(parked_list) do
    ids[i] = p[1]
    count_of[p[1]] = p[4]
  end
  claim(ids, count_of, 0)
end
if ARGV[5] == '1' and #entries < room then
  local want = room - #entries
  local idle = redis.call('XPENDING', key, group, 'IDLE', ARGV[6], cursor, '+', want)
  if #idle < want then
    cursor = '-'
  else
    cursor = '(' .. idle[#idle][1]
  end
  local ids, count_of = {}, {}
  for _, p in ipairs(idle) do
    if p[2] ~= me and p[2] ~= parked then
      ids[#ids + 1] = p[1]
      count_of[p[1]] = p[4]
    end
  end
  claim(ids, count_of, ARGV[6])
end
local fresh = false
if #entries < n then
  fresh = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', n - #entries,
                     'STREAMS', key, '>')
end
return {entries, counts, fresh, cursor}
"""

# KEYS[1] stream
# ARGV group, me, parked, then pairs: entry id, attempts made so far
# Parks each entry still owned by ``me`` with its delivery counter set to the attempts made.
NACK = """
local key = KEYS[1]
local group, me, parked = ARGV[1], ARGV[2], ARGV[3]
local moved = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local p = redis.call('XPENDING', key, group, id, id, 1)
  if p[1] and p[1][2] == me then
    redis.call('XCLAIM', key, group, parked, 0, id, 'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    moved = moved + 1
  end
end
return moved
"""

# KEYS[1] stream
# ARGV group, me, parked, then the ids this consumer handed to the application (attempted)
# Parks every entry ``me`` still holds, then deletes the consumer. An entry the application
# never saw (its fetch was cancelled) keeps the attempt count it had before that fetch.
HANDBACK = """
local key = KEYS[1]
local group, me, parked = ARGV[1], ARGV[2], ARGV[3]
local seen = {}
for i = 4, #ARGV do seen[ARGV[i]] = true end
local ok, pending = pcall(redis.call, 'XPENDING', key, group, '-', '+', 1000000, me)
if not ok then return 0 end
for _, p in ipairs(pending) do
  local count = p[4]
  if not seen[p[1]] and count > 0 then count = count - 1 end
  redis.call('XCLAIM', key, group, parked, 0, p[1], 'RETRYCOUNT', count, 'JUSTID')
end
redis.call('XGROUP', 'DELCONSUMER', key, group, me)
return #pending
"""

# KEYS[1] stream
# ARGV group, me, then the ids to renew
# -> the ids among them that are no longer pending under ``me`` (another member claimed them,
#    or they were settled, or the group is gone)
# Resets the idle time of every id still pending under ``me`` with ``XCLAIM ... 0 ... JUSTID``
# (JUSTID leaves the delivery counter as it is). Ownership is checked first, in the same
# script: a bare XCLAIM with min-idle 0 would take an entry away from the member that owns it.
EXTEND = """
local key = KEYS[1]
local group, me = ARGV[1], ARGV[2]
local lost = {}
local ok, pending = pcall(redis.call, 'XPENDING', key, group, '-', '+', 1000000, me)
if not ok then
  for i = 3, #ARGV do lost[#lost + 1] = ARGV[i] end
  return lost
end
local mine = {}
for _, p in ipairs(pending) do mine[p[1]] = true end
local keep = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if mine[id] then keep[#keep + 1] = id else lost[#lost + 1] = id end
end
for first = 1, #keep, 1000 do
  local args = {key, group, me, 0}
  for j = first, math.min(first + 999, #keep) do args[#args + 1] = keep[j] end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return lost
"""

# KEYS[1] the topic's delayed set, KEYS[2] its stream
# ARGV delay in ms, then the entry's fields (i ID b BODY [k KEY] [h:NAME VALUE ...])
# -> the due time (ms of the server's clock, as text)
# The member is the fields packed with cmsgpack, scored by the server's TIME plus the delay, so
# every client's due time is on one clock. An identical member (same id, key, headers and body,
# e.g. a publish sent again after an unknown outcome) is stored once, due at the later time.
# A stream key holding another type is refused here, as XADD would refuse it.
DELAY = """
if redis.replicate_commands then redis.replicate_commands() end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'stream' and kind ~= 'none' then
  return redis.error_reply('WRONGTYPE the topic key holds a ' .. kind .. ', not a stream')
end
local now = redis.call('TIME')
local due = tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000 + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], due, cmsgpack.pack({unpack(ARGV, 2)}))
return string.format('%.3f', due)
"""

# KEYS[1] the topic's delayed set, KEYS[2] its stream
# ARGV the most entries to move, then XADD's trim arguments (MAXLEN ~ N / MINID ~ ID, or none)
# -> {entries moved, the earliest due time left (text) or false, the server's time in ms (text)}
# Appends every due member (oldest due first) to the stream and removes it from the set, one
# member at a time: atomic as a whole, so concurrent movers never move one member twice, and an
# error part-way (a stream key replaced by another type) leaves each member either moved or
# still waiting, never both.
MOVE = """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + tonumber(now[2]) / 1000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ms, 'LIMIT', 0, tonumber(ARGV[1]))
local head = {KEYS[2]}
for i = 2, #ARGV do head[#head + 1] = ARGV[i] end
head[#head + 1] = '*'
local nhead = #head
for _, member in ipairs(due) do
  local args = {unpack(head)}
  local fields = cmsgpack.unpack(member)
  for j = 1, #fields do args[nhead + j] = fields[j] end
  redis.call('XADD', unpack(args))
  redis.call('ZREM', KEYS[1], member)
end
local left = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, left[2] or false, string.format('%.3f', ms)}
"""
