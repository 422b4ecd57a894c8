"""Deterministic, distributed batching of the train split: the global batch of every optimizer step.

Why a plain sampler and not Ray Data: the train split of MELD-ST (a few thousand utterances) and
the synthetic corpus fit in every worker's memory as a manifest, and the objective needs each
*global* batch (the effective batch of one optimizer step) to be the same set of utterances
whatever the number of workers — that is what makes a 2-worker run equal a 1-worker run and a
resumed run equal an uninterrupted one. A seeded plan over indices gives that in a few lines;
Ray Data's streaming split gives neither exact batch composition nor a cheap "skip to step k".

Two plans (`data.sampler`), one contract (`BatchPlan`): `global_batches(epoch)` is a pure function of
(seed, epoch) and never of the world size; worker `rank` takes the contiguous slice
`[rank * per_worker, (rank + 1) * per_worker)` of each global batch (sorted by decreasing audio length,
so a micro-batch holds similar lengths) and cuts it into `accum` micro-batches; resuming at step k of an
epoch is `worker_micro_batches(epoch, rank, start_step=k)`.

`GlobalBatchPlan` (data.sampler=length, the default), for one epoch:
1. permute all train indices with `seed + epoch`;
2. cut the permutation into windows of `group_factor` global batches, sort each window by audio
   length (long utterances end up together, which cuts padding) and cut it into global batches;
3. shuffle the order of the global batches (same RNG), drop the last incomplete one.

`StratifiedBatchPlan` (data.sampler=stratified): every global batch holds a fixed quota k_c ≥
`min_per_cell` of every (stratum, attribute) cell c present in train, so every step's MinMaxGAP term sees
every stratum valid. Each cell is an endless stream of its rows: pass j of cell c is a permutation seeded
by (seed, c, j), and step t (counted over the whole run: epoch × steps_per_epoch + step) takes positions
[t·k_c, (t+1)·k_c) of that stream. So small cells are cycled through many times per epoch, every row of a
cell is drawn equally often pass after pass, and any step's batch is computed without replaying the
ones before it. The cell's sampling share k_c / B differs from its population share n_c / N; the ERM term
undoes that with the per-cell weights `importance_weights()` (see `objective.erm_weighting`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


class BatchPlan:
    """Which utterances each worker sees in each micro-batch of each optimizer step (the shared part).

    lengths: audio length (samples) per train row; the plan returns row indices into it.
    effective_batch: utterances per optimizer step over all workers (= micro × accum × workers).
    Subclasses define `steps_per_epoch` and `global_batches(epoch)`.
    """

    def __init__(self, lengths: Sequence[int], *, effective_batch: int, num_workers: int, accum: int,
                 seed: int) -> None:
        if effective_batch % (num_workers * accum):
            raise ValueError(f"effective_batch {effective_batch} is not divisible by workers × accum "
                             f"({num_workers} × {accum})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.effective_batch = effective_batch
        self.num_workers = num_workers
        self.accum = accum
        self.micro = effective_batch // (num_workers * accum)
        self.seed = seed

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.effective_batch

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (each sorted by decreasing length); independent of world size."""
        raise NotImplementedError

    def worker_micro_batches(self, epoch: int, rank: int, start_step: int = 0) -> list[list[list[int]]]:
        """For steps `start_step..` of `epoch`: [step][micro][index] for worker `rank`."""
        per_worker = self.micro * self.accum
        steps = []
        for gb in self.global_batches(epoch)[start_step:]:
            mine = gb[rank * per_worker:(rank + 1) * per_worker]
            steps.append([mine[m * self.micro:(m + 1) * self.micro].tolist() for m in range(self.accum)])
        return steps

    def _by_length(self, rows: np.ndarray) -> np.ndarray:
        # Stable sort on -length, ties keep the (random) order they come in.
        return rows[np.argsort(-self.lengths[rows], kind="stable")]


class GlobalBatchPlan(BatchPlan):
    """Length-grouped batches of a random permutation: every row at most once per epoch (module docstring)."""

    def __init__(self, lengths: Sequence[int], *, effective_batch: int, num_workers: int, accum: int,
                 seed: int, group_factor: int = 8) -> None:
        super().__init__(lengths, effective_batch=effective_batch, num_workers=num_workers, accum=accum, seed=seed)
        self.group_factor = group_factor

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        window = self.effective_batch * self.group_factor
        batches: list[np.ndarray] = []
        for start in range(0, len(order), window):
            chunk = self._by_length(order[start:start + window])
            for b in range(0, len(chunk) - self.effective_batch + 1, self.effective_batch):
                batches.append(chunk[b:b + self.effective_batch])
        # Incomplete tails of windows are dropped too; reshuffling each epoch drops different rows.
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm][: self.steps_per_epoch]


def cell_quotas(counts: dict[int, int], *, batch: int, min_per_cell: int) -> dict[int, int]:
    """Rows of each cell in every global batch: `min_per_cell` each, the rest shared in proportion to the
    cells' train counts (largest remainders; ties go to the cell listed first).

    counts: {cell id: train rows} of the cells present (> 0). Raises ValueError when the reserved slots
    alone exceed the batch (min_per_cell × cells > batch).
    """
    cells = [c for c in counts if counts[c] > 0]
    reserved = min_per_cell * len(cells)
    if min_per_cell < 1:
        raise ValueError(f"min_per_cell must be at least 1, got {min_per_cell}")
    if reserved > batch:
        raise ValueError(f"min_per_cell ({min_per_cell}) × {len(cells)} cells = {reserved} exceeds the global "
                         f"batch of {batch}")
    free, total = batch - reserved, sum(counts[c] for c in cells)
    ideal = {c: free * counts[c] / total for c in cells}
    extra = {c: int(np.floor(ideal[c])) for c in cells}
    by_remainder = sorted(cells, key=lambda c: -(ideal[c] - extra[c]))  # stable: ties keep the listed order
    for c in by_remainder[:free - sum(extra.values())]:
        extra[c] += 1
    return {c: min_per_cell + extra[c] for c in cells}


class StratifiedBatchPlan(BatchPlan):
    """Global batches with a fixed quota of every train cell (module docstring).

    cells: the cell id of each train row (e.g. stratum × num_attrs + attribute), aligned with `lengths`.
    """

    def __init__(self, lengths: Sequence[int], cells: Sequence[int], *, effective_batch: int, num_workers: int,
                 accum: int, seed: int, min_per_cell: int = 1) -> None:
        super().__init__(lengths, effective_batch=effective_batch, num_workers=num_workers, accum=accum, seed=seed)
        self.cells = np.asarray(cells, dtype=np.int64)
        if self.cells.shape != self.lengths.shape:
            raise ValueError(f"{len(self.cells)} cell ids for {len(self.lengths)} rows")
        ids, n = np.unique(self.cells, return_counts=True)
        self.members = {int(c): np.flatnonzero(self.cells == c) for c in ids}
        self.quotas = cell_quotas({int(c): int(k) for c, k in zip(ids, n)}, batch=effective_batch,
                                  min_per_cell=min_per_cell)
        self.min_per_cell = min_per_cell
        self._pass = lru_cache(maxsize=4 * len(ids))(self._pass_order)

    def _pass_order(self, cell: int, j: int) -> np.ndarray:
        """Pass j over cell `cell`: its rows in a seeded order."""
        rows = self.members[cell]
        return rows[np.random.default_rng([self.seed, cell, j]).permutation(len(rows))]

    def _draw(self, cell: int, start: int, k: int) -> list[int]:
        """Positions [start, start + k) of the cell's endless stream of passes."""
        n = len(self.members[cell])
        return [int(self._pass(cell, p // n)[p % n]) for p in range(start, start + k)]

    def global_batch(self, t: int) -> np.ndarray:
        """The batch of the run's t-th optimizer step (t = epoch × steps_per_epoch + step in epoch)."""
        rows = np.array([i for c, k in self.quotas.items() for i in self._draw(c, t * k, k)], dtype=np.int64)
        return self._by_length(rows[np.random.default_rng([self.seed, t]).permutation(len(rows))])

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        first = epoch * self.steps_per_epoch
        return [self.global_batch(first + s) for s in range(self.steps_per_epoch)]

    def sampling_shares(self) -> dict[int, float]:
        """Share of every global batch that is cell c: k_c / B."""
        return {c: k / self.effective_batch for c, k in self.quotas.items()}

    def importance_weights(self) -> dict[int, float]:
        """w_c = (n_c / N) / (k_c / B): population share over sampling share. Σ_i w_{c(i)} ℓ_i / B over a
        global batch is then an unbiased estimate of the train-population mean loss, and it is exact over
        any run of steps in which every cell completes whole passes (tests/test_sampler.py)."""
        n_total = len(self.lengths)
        return {c: (len(self.members[c]) / n_total) / share for c, share in self.sampling_shares().items()}


def build_plan(cfg, lengths: Sequence[int], cells: Sequence[int], *, num_workers: int, accum: int) -> BatchPlan:
    """The plan `cfg.data.sampler` names for a RunConfig's train split (cells: each row's cell id)."""
    common = {"effective_batch": cfg.optim.effective_batch_size, "num_workers": num_workers, "accum": accum,
              "seed": cfg.optim.seed}
    if cfg.data.sampler == "stratified":
        return StratifiedBatchPlan(lengths, cells, min_per_cell=cfg.data.min_per_cell, **common)
    return GlobalBatchPlan(lengths, **common)


@dataclass
class BatchCoverage:
    """How well the optimizer steps covered the train cells, measured on each step's GLOBAL cell counts.

    A step is *valid* when at least one stratum has every attribute value in its global batch (otherwise
    MinMaxGAP's gap term is exactly 0); `min_cell_count` is the fewest examples of a cell present in train.
    Plain ints so it travels in the checkpoint's TrainerState and a resumed run keeps counting.
    """

    steps: int = 0
    valid_steps: int = 0
    min_cell_count: int | None = None

    def add(self, counts, valid, in_train) -> dict[str, float]:
        """One step: counts [S, A] global cell counts, valid [S] bool, in_train [S, A] bool. Returns the
        step's `valid_strata` and `min_cell_count` (what the recipe logs as train/…)."""
        counts, in_train = np.asarray(counts, dtype=np.float64), np.asarray(in_train, dtype=bool)
        n_valid = int(np.asarray(valid, dtype=bool).sum())
        least = int(counts[in_train].min()) if in_train.any() else 0
        self.steps += 1
        self.valid_steps += n_valid > 0
        self.min_cell_count = least if self.min_cell_count is None else min(self.min_cell_count, least)
        return {"valid_strata": n_valid, "min_cell_count": least}

    def summary(self) -> dict[str, float]:
        """`valid_step_share` (fraction of steps) and `min_cell_count` (over all steps); NaN before any step."""
        nan = float("nan")
        return {"valid_step_share": self.valid_steps / self.steps if self.steps else nan,
                "min_cell_count": float(self.min_cell_count) if self.min_cell_count is not None else nan}


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
