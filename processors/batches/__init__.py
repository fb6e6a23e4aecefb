"""The batch tier: requests that can wait go to the providers' batch APIs at half the price.

A request whose tier is ``batch`` (asked for, the configured default, or ``auto`` with a far
deadline; see :mod:`processors.tiers`) is claimed as any other, then gathered with others for
the same provider and model (:mod:`.collector`) and submitted through the provider's batch API
(:mod:`.api`): its event's offset is committed once its record says ``batched``, not when it is
answered. From then on the record is the source of truth, and whichever worker holds the batch's
lease polls it and stores and emits each line's outcome (:mod:`.poller`). What is written when,
and what a worker that takes over after a crash does, is in :mod:`llmstream.core.record.batches`.

A request in a batch is never also called synchronously unless its batch line failed: a failed
(retryable) or expired line is sent again in a later batch, or called at once when its deadline
leaves no room for one.
"""

from llmstream.processors.batches.api import BatchAPI, batch_apis
from llmstream.processors.batches.tier import BatchTier

__all__ = ["BatchAPI", "BatchTier", "batch_apis"]
