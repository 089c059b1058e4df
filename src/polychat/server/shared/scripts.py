"""The Lua scripts that make each shared decision atomic in Redis, on Redis's own clock (``TIME``), never a replica's.

Every decision is one script call: no replica reads a count and writes it back, so R requests per minute pass in
all, however many replicas take them.
"""

from __future__ import annotations

__all__ = ["CLAIM", "LEASE_REFRESH", "LEASE_TAKE", "RATE", "REST", "UNCLAIM"]

# KEYS[1]: the bucket (a hash: t = tokens left, c = when counted, in seconds); ARGV[1]: per minute.
# Returns "0" when the request may go (and counts it), else the seconds until it may. The key expires when the
# bucket is full again (a full bucket and no bucket are the same).
RATE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local capacity = tonumber(ARGV[1])
local rate = capacity / 60
local saved = redis.call('HMGET', KEYS[1], 't', 'c')
local tokens = tonumber(saved[1]) or capacity
local counted = tonumber(saved[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - counted) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'c', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((capacity - tokens) / rate * 1000)))
return tostring(wait)
"""

# KEYS[1]: the holder's leases (a sorted set: lease id -> when it expires, in ms); ARGV: cap, lease id, ttl in ms.
# Expired leases (a replica that died holding them) are dropped first. Returns 1 if the lease was taken, else 0.
LEASE_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1]: the holder's leases; ARGV[1]: ttl in ms, ARGV[2...]: the lease ids still held. Pushes their expiry on.
LEASE_REFRESH = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1]: an upstream's rest; ARGV[1]: its length in ms. Lengthens the rest, never shortens it; returns 1 if it
# did lengthen it (the other replicas are then told).
REST = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) >= ms then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
return 1
"""

# KEYS[1]: a running generation's name; ARGV[1]: this replica's id, ARGV[2]: ttl in ms. Sets it (again) for this
# replica unless another replica holds it (a name that expired and was taken elsewhere stays that replica's).
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS[1]: a running generation's name; ARGV[1]: this replica's id. Deletes it only if this replica still holds it.
UNCLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
