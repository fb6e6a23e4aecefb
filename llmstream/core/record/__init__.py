"""The request record: one Redis hash per request ID, the one owner of its keys, states, fields,
scripts and TTLs. The worker's dedup (:mod:`processors.dedup`), the ingress
(:mod:`ingress.results`) and replay (:mod:`llmstream.replay`) all go through here.

Keys and fields are in :mod:`.keys` (``{prefix}req:{<id>}``: the ID is the Redis Cluster hash
tag), every script in :mod:`.scripts`, the operations in :mod:`.store`.

Transitions (``owner``/``epoch`` change only where said)::

    (none)    --reserve (ingress)-------> queued     client, digest, queued_at_ms, queued_by
    queued    --release (publish failed)> (none)     only the reservation's own token
    (none)|queued --claim---------------> claimed    owner = worker, epoch + 1
    claimed   --claim, owner seen dead--> claimed    owner = taker, epoch + 1 (takeover)
    claimed   --settle (owner + epoch)--> completed | failed, emitted = 0
    claimed   --unclaim (owner + epoch)-> queued     owner dropped, epoch + 1 (task ended unsettled)
    completed|failed --mark emitted-----> emitted = 1: later claims answer done
    completed|failed, not emitted, owner seen dead --claim--> recover: owner = taker, epoch + 1
    failed    --replay reset------------> queued     outcome dropped, epoch + 1

    claimed   --into a batch (owner + epoch)-----> submitting  submission, request kept, calls + 1
    submitting --claim, owner seen dead----------> submitting  owner = taker, epoch + 1 (resolve)
    submitting --batched (submission)------------> batched     batch, owner dropped, epoch + 1
    batched   --claim--------------------------> (unchanged: the batch answers it)
    submitting|batched --out of batch (submission)-> claimed   owner = taker, epoch + 1
    submitting|batched --line outcome (submission)-> completed | failed, owner = poller, epoch + 1

The batch tier's steps, and how a request in a batch survives crashes, are in :mod:`.batches`.

TTLs: a record lives ``LLMSTREAM_RESULT_TTL_S`` from its creation (reserve or claim) and again
from its settle; marking emitted never creates or extends a record. A record going into a batch
lives two days more (the provider's 24 h window may pass before its outcome is stored). A rejection
(``{prefix}rejected:{<id>}``) lives the same TTL. A worker's heartbeat
(``{prefix}worker:{<token>}``) lives one lease and is renewed several times per lease.

Ownership, takeover and fencing. A claim is owned through the owner's heartbeat, a key in another
hash slot, which a script on Redis Cluster may not read. So the claim script never reads it: when
the record is held by another worker, the claim answers ``busy`` with the owner's token and the
record's ``epoch``; the claimant reads that heartbeat with a plain command and, only when it is
gone, runs the claim again saying "owner X at epoch E was seen dead". The script takes over only
if the record is still owned by X at E, and moves the epoch on. Storing an outcome (settle) is
fenced by owner *and* epoch, and so is the still-owner check (the worker script's ``o`` call,
``DedupStore.still_owner``), and its variant ``a`` that a worker runs before each provider
attempt (``DedupStore.before_call``): it also counts the call in the record's ``calls``, so calls
are numbered 1, 2, 3 … per request ID over every worker that held it (a taker after a crash goes
on from the dead worker's count). Streamed chunks carry that number as their ``attempt``.

- Owner alive again after a stall (its heartbeat lapsed, the taker saw that, then the owner
  renewed before the takeover script ran): the takeover still happens, which is right, since a
  lapsed lease is forfeit. The old owner's epoch is now stale: its settle stores nothing, and its
  still-owner check answers false, so at most one outcome is stored and emitted.
- A racing renewal cannot make two owners: the takeover is one script comparing owner and epoch;
  two takers that both saw X dead race on the same comparison, and the first moves the epoch,
  so the second answers ``busy`` (the new owner is alive).
- Redis failover: replication is asynchronous, so a promoted replica can miss the last writes.
  The record then falls back to an earlier state; a takeover that was lost leaves the old owner
  and epoch in place, so the old owner's settle is accepted and the taker's is fenced. Either way
  one writer wins per epoch; what a failover can cost is a second provider call or a second
  emission (at least once), never two outcomes accepted under one epoch.
- Lost state (Redis restarted empty): a record without owner and epoch belongs to nobody, so a
  settle stores its outcome instead of dropping a request the broker will never redeliver.
  Workers notice the loss by the deployment epoch (:mod:`.epoch`) and claim nothing more until
  an operator accepts it (``llmstream recover-redis --accept-loss``).
"""

from llmstream.core.record.batches import LineRecord, Submission, SubmissionStore
from llmstream.core.record.epoch import DeploymentEpoch
from llmstream.core.record.keys import (
    AnyRedis,
    BatchField,
    BatchState,
    Field,
    RecordKeys,
    State,
    by_slot,
    slot,
)
from llmstream.core.record.store import (
    ClaimUnavailable,
    Outcome,
    RecordStore,
    Reservation,
    Status,
    Stored,
    StoredOutcome,
    WorkerOp,
)

__all__ = [
    "AnyRedis",
    "BatchField",
    "BatchState",
    "ClaimUnavailable",
    "DeploymentEpoch",
    "Field",
    "LineRecord",
    "Outcome",
    "RecordKeys",
    "RecordStore",
    "Reservation",
    "State",
    "Status",
    "Stored",
    "StoredOutcome",
    "Submission",
    "SubmissionStore",
    "WorkerOp",
    "by_slot",
    "slot",
]
