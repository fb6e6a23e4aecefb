"""Every Lua script that writes a request's record. Each touches only the keys it is given
(``KEYS``), all of one request ID's hash slot or, batched, of one slot (see :func:`by_slot`)."""

from __future__ import annotations

# The worker's calls, batched: KEYS[i] is the record of call i. ARGV[1] the worker's token,
# ARGV[2] the result TTL (s), ARGV[3] the calls as one JSON array of [kind, a1, a2, a3, a4] (one
# argument: redis-py spends about 0.5 µs of the worker's CPU encoding each argument, and a
# request makes four calls), by kind:
#   c (claim)        now_ms, owner seen dead ('' for none), that owner's epoch seen
#   s (settle)       c|f (completed/failed), payload, now_ms, own epoch
#   m (mark emitted) -
#   o (still owner)  own epoch
#   u (unclaim)      own epoch
# and the batch tier's (see batches.py):
#   b (into a batch)   submission, request JSON, source, own epoch
#   B (batched)        submission, the provider's batch ID
#   x (out of a batch) submission, now_ms
#   r (a batch line's outcome)  c|f, payload, now_ms, submission
# Reply: {answers, extra, ...}; answers is one space-separated string (redis-py spends far more
# CPU per reply element it parses than Redis spends running the script), one answer per call:
#   claim   claimed:<epoch> | takeover:<epoch> | busy:<epoch> (+ owner in extra)
#           | done:<state> (+ payload) | recover:<state>:<epoch> (+ payload)
#           | batched:<epoch> (+ submission) | resolve:<epoch> (+ submission)
#   settle  1 stored | 0 fenced;   still owner  1 | 0;   mark  -;   unclaim  1 | 0
#   b  calls so far | 0 fenced;   B  1 | 0;   x, r  the new epoch | 0 (not in that submission)
WORKER = """
local token, ttl = ARGV[1], ARGV[2]
local calls = cjson.decode(ARGV[3])
-- A request in a batch lives as long as the provider's 24 h window may take, and more.
local batch_ttl = tonumber(ttl) + 172800

local function claim(key, now, dead, dead_epoch)
  local h = redis.call('HMGET', key, 'state', 'owner', 'emitted', 'epoch')
  local state, owner, emitted, epoch = h[1], h[2], h[3], h[4] or '0'
  -- The caller saw this owner's heartbeat gone while the record was at this epoch.
  local lapsed = owner ~= false and owner == dead and epoch == dead_epoch
  if state == 'completed' or state == 'failed' then
    local payload = redis.call('HGET', key, state == 'completed' and 'response' or 'error')
    if emitted == '1' then return {'done:' .. state, payload or ''} end
    if owner and not lapsed then return {'busy:' .. epoch, owner} end
    epoch = redis.call('HINCRBY', key, 'epoch', 1)
    redis.call('HSET', key, 'owner', token)
    redis.call('HINCRBY', key, 'takeovers', 1)
    return {'recover:' .. state .. ':' .. epoch, payload or ''}
  end
  -- A batch holds it: its poller answers, nobody calls.
  if state == 'batched' then
    return {'batched:' .. epoch, redis.call('HGET', key, 'submission') or ''}
  end
  if (state == 'claimed' or state == 'submitting') and owner and not lapsed then
    return {'busy:' .. epoch, owner}
  end
  epoch = redis.call('HINCRBY', key, 'epoch', 1)
  if state == 'submitting' then
    -- Its owner died submitting it: the taker finds out whether that batch exists first.
    redis.call('HSET', key, 'owner', token, 'claimed_at_ms', now)
    redis.call('HINCRBY', key, 'takeovers', 1)
    return {'resolve:' .. epoch, redis.call('HGET', key, 'submission') or ''}
  end
  if state == 'claimed' then
    redis.call('HSET', key, 'owner', token, 'claimed_at_ms', now)
    redis.call('HINCRBY', key, 'takeovers', 1)
    return {'takeover:' .. epoch}
  end
  redis.call('HSET', key, 'state', 'claimed', 'owner', token, 'emitted', '0', 'claimed_at_ms', now)
  redis.call('EXPIRE', key, ttl)
  return {'claimed:' .. epoch}
end

-- Fenced by owner and epoch. A record with neither is not a lost claim but lost state (Redis
-- restarted empty or was flushed, perhaps re-created queued by the ingress): nobody else owns
-- the request, so the outcome is stored; refusing would ack an unemitted request.
local function ours(key, my_epoch)
  local h = redis.call('HMGET', key, 'owner', 'epoch')
  return (not h[1] or h[1] == token) and (not h[2] or h[2] == my_epoch)
end

local function settle(key, code, payload, now, my_epoch)
  if not ours(key, my_epoch) then return {'0'} end
  local state, field = 'completed', 'response'
  if code == 'f' then state, field = 'failed', 'error' end
  redis.call('HSET', key, 'state', state, field, payload, 'settled_at_ms', now, 'owner', token,
             'epoch', my_epoch, 'emitted', '0')
  redis.call('HDEL', key, 'request', 'source')  -- kept while a batch held it; no more use
  redis.call('EXPIRE', key, ttl)
  return {'1'}
end

-- A task that ended without settling gives its claim back, so another worker need not wait for
-- this worker's lease to end. Only a claim still ours, at our epoch and still 'claimed': a stored
-- outcome is never touched, nor a claim taken over meanwhile. Back to 'queued' (what the ingress
-- shows as pending); the epoch moves on, so nothing the ended task left behind can settle.
local function unclaim(key, my_epoch)
  local h = redis.call('HMGET', key, 'state', 'owner', 'epoch')
  if h[1] ~= 'claimed' or h[2] ~= token or h[3] ~= my_epoch then return {'0'} end
  redis.call('HDEL', key, 'owner', 'claimed_at_ms')
  redis.call('HSET', key, 'state', 'queued')
  redis.call('HINCRBY', key, 'epoch', 1)
  return {'1'}
end

-- The batch tier. Into a batch: only a claim still ours, at our epoch; counted as a call.
local function into_batch(key, submission, request, source, my_epoch)
  local h = redis.call('HMGET', key, 'state', 'owner', 'epoch')
  if (h[1] ~= 'claimed' and h[1] ~= 'submitting') or h[2] ~= token or h[3] ~= my_epoch then
    return {'0'}
  end
  redis.call('HSET', key, 'state', 'submitting', 'submission', submission, 'request', request,
             'source', source)
  local calls = redis.call('HINCRBY', key, 'calls', 1)
  redis.call('EXPIRE', key, batch_ttl)
  return {tostring(calls)}
end

-- Fenced by the submission, not the owner: whoever learns that the provider accepted it (the
-- submitter, or a taker of its requests) may say so. The record then belongs to the batch.
local function in_submission(key, submission)
  local h = redis.call('HMGET', key, 'state', 'submission')
  return (h[1] == 'submitting' or h[1] == 'batched') and h[2] == submission
end

local function batched(key, submission, batch)
  if redis.call('HGET', key, 'state') ~= 'submitting' or not in_submission(key, submission) then
    return {'0'}
  end
  redis.call('HSET', key, 'state', 'batched', 'batch', batch)
  redis.call('HDEL', key, 'owner', 'claimed_at_ms')
  redis.call('HINCRBY', key, 'epoch', 1)
  redis.call('EXPIRE', key, batch_ttl)
  return {'1'}
end

-- Out of the batch, claimed by this worker (to be batched again, or called): one taker wins.
local function out_of_batch(key, submission, now)
  if not in_submission(key, submission) then return {'0'} end
  local epoch = redis.call('HINCRBY', key, 'epoch', 1)
  redis.call('HSET', key, 'state', 'claimed', 'owner', token, 'claimed_at_ms', now)
  redis.call('HDEL', key, 'submission', 'batch')
  return {tostring(epoch)}
end

-- A batch line's outcome, stored by the batch's poller; it owns the record until it emits.
-- The submission stays, so the batch's next poller knows the outcome is its own to emit.
local function settle_line(key, code, payload, now, submission)
  if not in_submission(key, submission) then return {'0'} end
  local state, field = 'completed', 'response'
  if code == 'f' then state, field = 'failed', 'error' end
  local epoch = redis.call('HINCRBY', key, 'epoch', 1)
  redis.call('HSET', key, 'state', state, field, payload, 'settled_at_ms', now, 'owner', token,
             'emitted', '0')
  redis.call('HDEL', key, 'request', 'source')
  redis.call('EXPIRE', key, ttl)
  return {tostring(epoch)}
end

local answers, reply = {}, {''}
for i, key in ipairs(KEYS) do
  local call = calls[i]
  local kind, r = call[1], nil
  if kind == 'c' then
    r = claim(key, call[2], call[3], call[4])
  elseif kind == 's' then
    r = settle(key, call[2], call[3], call[4], call[5])
  elseif kind == 'o' then
    r = {ours(key, call[2]) and '1' or '0'}
  elseif kind == 'a' then
    -- A provider call begins: still ours, and which call it is for this ID over every owner.
    -- Never creates a record (an expired one has nothing to count into).
    if not ours(key, call[2]) then
      r = {'0'}
    elseif redis.call('EXISTS', key) == 1 then
      r = {tostring(redis.call('HINCRBY', key, 'calls', 1))}
    else
      r = {'1'}
    end
  elseif kind == 'u' then
    r = unclaim(key, call[2])
  elseif kind == 'b' then
    r = into_batch(key, call[2], call[3], call[4], call[5])
  elseif kind == 'B' then
    r = batched(key, call[2], call[3])
  elseif kind == 'x' then
    r = out_of_batch(key, call[2], call[3])
  elseif kind == 'r' then
    r = settle_line(key, call[2], call[3], call[4], call[5])
  else
    -- Only an existing record: an expired one is not recreated without a TTL.
    if redis.call('EXISTS', key) == 1 then redis.call('HSET', key, 'emitted', '1') end
    r = {'-'}
  end
  answers[#answers + 1] = r[1]
  if r[2] then reply[#reply + 1] = r[2] end
end
reply[1] = table.concat(answers, ' ')
return reply
"""

# KEYS[1] the rejection; ARGV: error JSON, invalid field ('' for none), ttl_s.
REJECT = """
redis.call('HSET', KEYS[1], 'error', ARGV[1], 'field', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# The ingress. KEYS: records. ARGV: now_ms, ttl_s, client ('' for none), requeue_after_ms,
# reservation token, then one digest of the request's content per key.
# Per key: {'new'} (recorded as queued: publish it), {'stale'} (queued long ago and never claimed:
# publish it again), or {'exists', state, client, payload, digest}.
RESERVE = """
local out = {}
for i, key in ipairs(KEYS) do
  local digest = ARGV[5 + i]
  local h = redis.call('HMGET', key, 'state', 'client', 'queued_at_ms', 'response', 'error',
                       'digest')
  local state, client, known = h[1], h[2], h[6]
  -- Published again only for whom it was queued: a record of nobody (queued while
  -- authentication was off) is not an authenticated client's to republish.
  local same = (ARGV[3] == '' or client == ARGV[3]) and (not known or known == digest)
  if not state then
    redis.call('HSET', key, 'state', 'queued', 'queued_at_ms', ARGV[1], 'queued_by', ARGV[5],
               'digest', digest)
    if ARGV[3] ~= '' then redis.call('HSET', key, 'client', ARGV[3]) end
    redis.call('EXPIRE', key, ARGV[2])
    out[i] = {'new'}
  elseif state == 'queued' and same
      and tonumber(h[3] or '0') + tonumber(ARGV[4]) <= tonumber(ARGV[1]) then
    redis.call('HSET', key, 'queued_at_ms', ARGV[1], 'queued_by', ARGV[5])
    out[i] = {'stale'}
  else
    local payload = (state == 'completed' and h[4]) or (state == 'failed' and h[5]) or ''
    out[i] = {'exists', state, client or '', payload, known or ''}
  end
end
return out
"""

# KEYS: records; ARGV[1]: the reservation token. Drops reservations that were not published,
# unless a worker has the request already or another reservation replaced ours.
RELEASE = """
local n = 0
for _, key in ipairs(KEYS) do
  local h = redis.call('HMGET', key, 'state', 'queued_by')
  if h[1] == 'queued' and h[2] == ARGV[1] then redis.call('DEL', key) n = n + 1 end
end
return n
"""

# Replay. KEYS[1] the record; ARGV: now_ms, the replay's token.
# failed -> queued (the outcome dropped, the ingress's fields kept): 'reset'; no record: 'absent';
# otherwise the state, unchanged. The epoch moves on, so a worker that owned the failed request
# before cannot store into the replayed one (see settle's fence).
RESET = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'absent' end
if state ~= 'failed' then return state end
redis.call('HDEL', KEYS[1], 'error', 'owner', 'emitted', 'settled_at_ms', 'claimed_at_ms')
redis.call('HSET', KEYS[1], 'state', 'queued', 'queued_at_ms', ARGV[1], 'queued_by', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'replays', 1)
redis.call('HINCRBY', KEYS[1], 'epoch', 1)
return 'reset'
"""

# A batch submission (see batches.py). KEYS[1] the submission; ARGV[1] the operation, ARGV[2]
# the worker's token, then per operation:
#   intent   provider, model, requests JSON, now_ms, ttl_s  -> intent | the state found
#   created  own epoch, batch ID, now_ms                     -> created | the state found
#   abandon  owner seen dead, its epoch, ttl_s               -> abandoned | the state found
#   adopt    owner seen dead, its epoch, batch ID, now_ms    -> created | the state found
#   lease    owner seen dead, its epoch                      -> leased | busy
#   finish   own epoch                                       -> finished | busy
# Every answer is {answer, epoch, batch ID, changed}: changed is 1 when this call wrote the
# submission, 0 when it found it so (two workers settling one submission: one of them wrote it).
SUBMISSION = """
local key, op, token = KEYS[1], ARGV[1], ARGV[2]
local h = redis.call('HMGET', key, 'state', 'owner', 'epoch', 'batch')
local state, owner, epoch, batch = h[1], h[2], h[3] or '0', h[4] or ''
local changed = 0
local function answer(what) return {what, epoch, batch, changed} end
-- The owner the caller saw dead still holds it, at the epoch seen.
local function lapsed(at) return owner ~= false and owner == ARGV[at] and epoch == ARGV[at + 1] end

if op == 'intent' then
  if state then return answer(state) end
  redis.call('HSET', key, 'state', 'intent', 'owner', token, 'epoch', '1', 'provider', ARGV[3],
             'model', ARGV[4], 'requests', ARGV[5], 'created_at_ms', ARGV[6])
  redis.call('EXPIRE', key, ARGV[7])
  epoch, changed = '1', 1
  return answer('intent')
elseif op == 'created' then
  if state ~= 'intent' or owner ~= token or epoch ~= ARGV[3] then return answer(state or '') end
  redis.call('HSET', key, 'state', 'created', 'batch', ARGV[4], 'submitted_at_ms', ARGV[5])
  batch, changed = ARGV[4], 1
  return answer('created')
elseif op == 'abandon' then
  -- No submission recorded: none was sent (it is recorded before it is sent), and none will be.
  if not state then
    redis.call('HSET', key, 'state', 'abandoned')
    redis.call('EXPIRE', key, ARGV[5])
    changed = 1
    return answer('abandoned')
  end
  if state == 'intent' and lapsed(3) then
    redis.call('HSET', key, 'state', 'abandoned')
    changed = 1
    return answer('abandoned')
  end
  return answer(state)
elseif op == 'adopt' then
  if state ~= 'intent' or not lapsed(3) then return answer(state or '') end
  epoch = tostring(redis.call('HINCRBY', key, 'epoch', 1))
  redis.call('HSET', key, 'state', 'created', 'owner', token, 'batch', ARGV[5],
             'submitted_at_ms', ARGV[6])
  batch, changed = ARGV[5], 1
  return answer('created')
elseif op == 'lease' then
  if state ~= 'created' or not lapsed(3) then return answer('busy') end
  epoch = tostring(redis.call('HINCRBY', key, 'epoch', 1))
  redis.call('HSET', key, 'owner', token)
  changed = 1
  return answer('leased')
elseif op == 'finish' then
  if owner ~= token or epoch ~= ARGV[3] then return answer('busy') end
  redis.call('DEL', key)
  changed = 1
  return answer('finished')
end
return redis.error_reply('unknown operation ' .. op)
"""
