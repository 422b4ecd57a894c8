"""Deterministic, length-grouped, distributed batching of the train split.

Why a plain sampler and not Ray Data: the train split of MELD-ST (a few thousand utterances) and
the synthetic corpus fit in every worker's memory as a manifest, and the objective needs each
*global* batch (the effective batch of one optimizer step) to be the same set of utterances
whatever the number of workers — that is what makes a 2-worker run equal a 1-worker run and a
resumed run equal an uninterrupted one. A seeded plan over indices gives that in a few lines;
Ray Data's streaming split gives neither exact batch composition nor a cheap "skip to step k".

The plan for one epoch:
1. permute all train indices with `seed + epoch`;
2. cut the permutation into windows of `group_factor` global batches, sort each window by audio
   length (long utterances end up together, which cuts padding) and cut it into global batches;
3. shuffle the order of the global batches (same RNG), drop the last incomplete one;
4. inside a global batch (sorted by length), worker `rank` takes the contiguous slice
   `[rank * per_worker, (rank + 1) * per_worker)` and cuts it into `accum` micro-batches.
Steps 1–3 do not depend on the world size; step 4 only decides who computes which losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class GlobalBatchPlan:
    """Which utterances each worker sees in each micro-batch of each optimizer step.

    lengths: audio length (samples) per train row; the plan returns row indices into it.
    effective_batch: utterances per optimizer step over all workers (= micro × accum × workers).
    """

    def __init__(self, lengths: Sequence[int], *, effective_batch: int, num_workers: int, accum: int,
                 seed: int, group_factor: int = 8) -> None:
        if effective_batch % (num_workers * accum):
            raise ValueError(f"effective_batch {effective_batch} is not divisible by workers × accum "
                             f"({num_workers} × {accum})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.effective_batch = effective_batch
        self.num_workers = num_workers
        self.accum = accum
        self.micro = effective_batch // (num_workers * accum)
        self.seed = seed
        self.group_factor = group_factor

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.effective_batch

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (each sorted by decreasing length); independent of world size."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        window = self.effective_batch * self.group_factor
        batches: list[np.ndarray] = []
        for start in range(0, len(order), window):
            chunk = order[start:start + window]
            # Stable sort on -length, ties keep the random order.
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for b in range(0, len(chunk) - self.effective_batch + 1, self.effective_batch):
                batches.append(chunk[b:b + self.effective_batch])
        # Incomplete tails of windows are dropped too; reshuffling each epoch drops different rows.
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm][: self.steps_per_epoch]

    def worker_micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> list[list[list[int]]]:
        """For steps `start_step..` of `epoch`: [step][micro][index] for worker `rank`."""
        per_worker = self.micro * self.accum
        steps = []
        for gb in self.global_batches(epoch)[start_step:]:
            mine = gb[rank * per_worker:(rank + 1) * per_worker]
            steps.append([mine[m * self.micro:(m + 1) * self.micro].tolist() for m in range(self.accum)])
        return steps


def shard_for_eval(lengths: Sequence[int], *, rank: int, num_workers: int, batch_size: int
                   ) -> list[list[tuple[int, bool]]]:
    """Split all rows across workers for evaluation, as batches of (row index, keep) pairs.

    Rows are sorted by length and dealt round-robin, so every worker gets a similar amount of audio.
    Every worker gets the same number of batches of the same sizes: the short shards are padded by
    repeating a row with keep=False (ZeRO-3 needs every rank in every forward; padded rows are dropped).
    """
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    per_worker = -(-len(order) // num_workers)
    mine = [(int(i), True) for i in order[rank::num_workers]]
    if mine or per_worker:
        filler = int(order[0]) if len(order) else 0
        mine += [(filler, False)] * (per_worker - len(mine))
    return [mine[b:b + batch_size] for b in range(0, len(mine), batch_size)]
