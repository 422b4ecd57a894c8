"""The training recipe: LoRA fine-tuning with ERM-MinMaxGAP on Ray Train workers running DeepSpeed.

Read it top to bottom (torchtune style, no Trainer base class):

    run_training (driver)        validate config and inputs → start/join Ray → build_trainer → fit → final metrics
    train_loop_per_worker        what every Ray Train worker runs:
        LoRARecipe.setup           _setup_model → _setup_data → _setup_engine → _restore → _setup_tracking
        LoRARecipe.train           epochs of optimizer_step; evaluate_and_checkpoint each epoch (or every N steps)
        LoRARecipe.optimizer_step  per-sample losses of all micro-batches → objective (the all-reduce) → backward
                                   → objective.after_step (Group DRO's q)
        LoRARecipe.evaluate_and_checkpoint   dev metrics (predict → split_metrics) → update_objective (λ) → track_best
                                   → save_checkpoint (ray.train.report)
        LoRARecipe.finish          best adapter → dev/test predictions, final report
        LoRARecipe.cleanup

The objective is `objective.kind` (ermgap.objectives: erm, minmaxgap, group_dro, reweight), built once in
setup over the train split's stratum × gender cells. Where the distributed reduction happens: only inside
the objective's `ermgap.objective.reduced_cell_stats` (cell loss sums/counts all-reduced with autograd)
and DeepSpeed's gradient averaging.

Gradient accumulation is done at the LOSS level, not by DeepSpeed: the objective's worst-language
gap is a non-linear function of group means over the whole effective batch (the paper's
mini-batch estimate), so per-micro-batch gaps summed over accumulation steps are a different
(biased) estimator. Each optimizer step therefore runs the forward of all its micro-batches,
keeps their per-sample losses (graphs alive), concatenates them, evaluates the objective once and
calls backward once. DeepSpeed is configured with gradient_accumulation_steps=1 and a micro-batch
of micro × accum, so it neither rescales the loss by 1/GAS nor reduces gradients mid-step. Cost:
activation memory of `accum` micro-batches (use gradient checkpointing on GPU, or more workers).
With this, a run with W workers and accumulation A equals one with W' workers and A' whenever
W·A·micro is the same (tests/test_train_distributed.py checks 2 workers vs 1 worker).

Data: the batch plan of `data.sampler` (`ermgap.sampler`: GlobalBatchPlan, seeded per epoch and
length-grouped; StratifiedBatchPlan, a fixed quota of every train cell per step, with the ERM weights that
keep the ERM term a population mean) fixes which utterances form each optimizer step independently of
the worker count; see that module's docstring for why not Ray Data.

Fault tolerance: every evaluation writes a checkpoint (ermgap.checkpointing: DeepSpeed state
without frozen weights, best LoRA adapter, the objective's state (λ, q), data position, per-rank RNG, MLflow run id) through
`ray.train.report`. A restarted worker group (FailureConfig) or `ermgap train --resume RUN_DIR`
(same storage_path + name: Ray Train V2 reloads the run's checkpoint manager) loads it and
continues at the same step with the same data order and RNG, so on CPU the result equals an
uninterrupted run. Tests inject faults through `FaultInjector` ($ERMGAP_FAULT_KILL_AT_STEP,
$ERMGAP_FAULT_NAN_AT_STEP, read by the drivers `run_training` and `run_sweep` only: `faults_from_env`).
A worker's user error ends the run without a retry, faults are retried: ermgap.failures.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
import transformers
import yaml
from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from ermgap import checkpointing, deepspeed_ops
from ermgap.batching import EmotionCollator, featurize, to_device
from ermgap.checkpointing import TrainerState
from ermgap.config import RunConfig, config_from_dict, default_tracking_uri, dump_yaml, flatten, load_config
from ermgap.data.dataset import UtteranceDataset
from ermgap.data.manifest import read_manifest
from ermgap.errors import ConfigError, ErmgapError, ErmgapWarning, ManifestError, TrainingError
from ermgap.evaluate import predictions_frame
from ermgap.failures import RunFault, fit_run, record_error
from ermgap.feature_cache import CacheStats, EncodedDataset, FeatureCache, cache_dir, encoder_fingerprint, supports
from ermgap.formatting import json_safe
from ermgap.io import atomic_path, discard_aside, restore_aside
from ermgap.metric_registry import RUN_COVERAGE, SPLIT_METRICS
from ermgap.metrics import compute_metrics, per_key
from ermgap.model import apply_lora, check_model, load_backbone
from ermgap.multinode import check_shared_paths, input_paths
from ermgap.objective import dev_gap, lambda_drive
from ermgap.objectives import CellGrid, Objective, ObjectiveOutput, build_objective
from ermgap.progress import ProgressBox, ProgressSender, TrainProgress
from ermgap.ray_runtime import ensure_ray
from ermgap.sampler import BatchCoverage, StratifiedBatchPlan, build_plan, cell_quotas, shard_for_eval
from ermgap.scoring import answer_loss_from_scores, per_sample_loss, score_labels
from ermgap.storage import Location
from ermgap.task import RUN_MODALITY, Task, TaskSpec
from ermgap.tracking import (
    BEST,
    EVAL,
    TAG_NOTE,
    TAG_WORKER_IPS,
    TAG_WORKER_NODES,
    RunLogger,
    check_server,
    close_orphaned_runs,
    describe_objective,
    driver_tag,
    log_manifest_input,
    mark_run,
    run_description,
    source_tags,
)

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
# Fault injection for tests: kill the last rank after step N / make its first loss NaN at step N.
FAULT_ENV = "ERMGAP_FAULT_KILL_AT_STEP"
NAN_ENV = "ERMGAP_FAULT_NAN_AT_STEP"
# The transformers schedule behind each `optim.scheduler` (all with linear warm-up).
SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


# =============================================================================== worker side


@dataclass(frozen=True)
class Strata:
    """The groups inside which the attribute gap is measured (`objective.stratum`, resolved into the run's
    Task): their names, in index order. Batches carry each example's index (`batch["stratum"]`)."""

    names: tuple[str, ...]

    @classmethod
    def from_task(cls, task: Task) -> Strata:
        return cls(task.stratum_values)

    @property
    def num(self) -> int:
        return len(self.names)

    def named(self, prefix: str, values) -> dict[str, float]:
        """{prefix + stratum name: value} for the strata whose value is defined (not NaN)."""
        flat = torch.as_tensor(values).detach().flatten().tolist()
        return {f"{prefix}{n}": v for n, v in zip(self.names, flat) if v == v}


class FaultInjector:
    """Test-only faults, configured by the driver (`faults_from_env` reads $ERMGAP_FAULT_*): kill the last
    rank once after optimizer step `kill_at_step` (like a lost node), or give its first per-sample
    loss of step `nan_at_step` a NaN. Inert unless configured."""

    def __init__(self, spec: dict[str, Any], *, rank: int, world: int) -> None:
        self.kill_at = spec.get("kill_at_step")
        self.nan_at = spec.get("nan_at_step")
        self.marker = Path(spec["marker"]) if spec.get("marker") else None
        self.last_rank = rank == world - 1
        self.rank = rank

    def poison(self, losses: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_at != step or not self.last_rank:
            return losses
        return losses * torch.where(torch.arange(len(losses)) == 0, float("nan"), 1.0)

    def after_step(self, step: int) -> None:
        if self.kill_at != step or not self.last_rank or self.marker is None or self.marker.exists():
            return
        self.marker.write_text(f"killed rank {self.rank} after step {step}\n")
        os._exit(1)  # die without cleanup, like a lost node


class _CachedFeatures(torch.utils.data.Dataset):
    """UtteranceDataset items with log-mel features computed once per worker and reused every epoch."""

    def __init__(self, base: UtteranceDataset, processor) -> None:
        self.base, self.processor, self.cache = base, processor, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        if i not in self.cache:
            self.cache[i] = featurize(self.processor, [self.base[i]])[0]
        return self.cache[i]


@dataclass
class _Split:
    rows: pd.DataFrame          # the manifest rows of the split, in manifest order
    base: UtteranceDataset      # decoded audio (lengths for batching)
    features: _CachedFeatures | EncodedDataset   # what the collator consumes: log-mels, or cached encoder output


class LoRARecipe:
    """One worker's view of a training run. Methods run in the order they are listed."""

    # ----------------------------------------------------------------------------- setup
    def setup(self, loop_config: dict[str, Any]) -> None:
        t_setup = time.perf_counter()
        self.loop_config = loop_config
        self.cfg = cfg = config_from_dict(loop_config["config"], source="loop_config")
        self.run_dir = Location.of(loop_config["run_dir"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self._check_services()
        self.accum = cfg.optim.effective_batch_size // (cfg.optim.micro_batch_size * self.world)
        # Resolved once on the driver (build_trainer): every rank, split and evaluation uses these indices.
        self.task = Task.from_dict(loop_config["task"])
        self.strata = Strata.from_task(self.task)
        self.faults = FaultInjector(loop_config.get("fault") or {}, rank=self.rank, world=self.world)
        self.progress = ProgressSender(loop_config.get("progress"), rank=self.rank)
        self.state = TrainerState()
        self.best_adapter: dict[str, torch.Tensor] | None = None
        self.logger: RunLogger | None = None
        self.timing = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}

        model, processor = self._setup_model()
        self._setup_data(processor, model)
        self._setup_engine(model)
        self.objective = self._build_objective()
        resumed = self._restore()
        self.coverage = BatchCoverage(**self.state.batch_coverage)
        self._setup_tracking(resumed)
        self.timing["setup_s"] = time.perf_counter() - t_setup

    def _check_services(self) -> None:
        """Fail the run at once, naming the node and the reason, when this worker cannot reach the
        run's store or (rank 0) the tracking server: otherwise the first checkpoint or MLflow call
        would retry for minutes."""
        where = f"worker {self.rank} on node {ray.util.get_node_ip_address()}"
        self.run_dir.check_reachable(where)
        if self.rank == 0:
            check_server(self.loop_config["mlflow"]["tracking_uri"], where)

    def _setup_model(self):
        """Seeded backbone + LoRA on this worker's device; the same seed on every rank gives an
        identical LoRA init (DeepSpeed also broadcasts rank 0's weights)."""
        cfg = self.cfg
        if cfg.distributed.use_gpu:
            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
        transformers.set_seed(cfg.optim.seed)
        model, processor = load_backbone(cfg.model, device=self.device)
        return apply_lora(model, cfg.lora), processor

    def _setup_data(self, processor, model) -> None:
        """The three splits, the collator and the global batch plan (same batches for any worker count)."""
        cfg, task = self.cfg, self.task
        df = run_manifest(cfg)
        self.splits: dict[str, _Split] = {}
        self.feature_cache = self._open_feature_cache(model, processor)
        for split in ("train", "dev", "test"):
            rows = df[df["split"] == split].reset_index(drop=True)
            base = UtteranceDataset(rows, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s,
                                    extra_columns=(task.attribute, *task.stratum))
            features = _CachedFeatures(base, processor) if self.feature_cache is None else EncodedDataset(
                base, self.feature_cache, model, processor, batch_size=cfg.eval.batch_size, device=self.device)
            self.splits[split] = _Split(rows, base, features)
        if self.feature_cache is not None:
            # Each rank encodes its share of the missing entries, then every rank reads all of them. A run
            # that trains nothing (zero-shot) never reads the train split.
            for name, data in self.splits.items():
                if name != "train" or cfg.optim.epochs > 0:
                    data.features.fill(range(self.rank, len(data.features), self.world))
            if self.world > 1:
                torch.distributed.barrier()
        self.collator = EmotionCollator(processor, cfg.prompt, cfg.data.modality, sample_rate=cfg.data.sample_rate,
                                        task=task)
        train = self.splits["train"]
        self.plan = build_plan(cfg, train.base.lengths, task.cell_codes(train.rows, cfg.data.modality),
                               num_workers=self.world, accum=self.accum)
        self.total_steps = cfg.optim.epochs * self.plan.steps_per_epoch

    def _open_feature_cache(self, model, processor) -> FeatureCache | None:
        """The encoder-output cache when the audio encoder is frozen (`ermgap.feature_cache`), else None."""
        directory = self.loop_config["feature_cache"]  # the driver's cache_dir: an S3 endpoint travels with it
        if directory is None or not supports(model):
            return None
        fingerprint = encoder_fingerprint(model, processor.feature_extractor, sample_rate=self.cfg.data.sample_rate,
                                          max_audio_s=self.cfg.data.max_audio_s)
        return FeatureCache(directory, fingerprint)

    def _build_objective(self) -> Objective:
        """`objective.kind` over the stratum × attribute cells, with the train split's cell counts (the same
        manifest rows on every rank, so the same objective everywhere)."""
        stratum, attribute = self._cells(self.splits["train"].rows)
        grid = CellGrid.count(stratum, attribute, strata=self.strata.names, attributes=self.task.attribute_values)
        if isinstance(self.plan, StratifiedBatchPlan) and self.cfg.objective.erm_weighting == "population":
            # The ERM term estimates the train-population mean again (config: objective.erm_weighting).
            grid = grid.with_erm_weights(self.plan.importance_weights())
        return build_objective(self.cfg, grid)

    def _setup_engine(self, model) -> None:
        """AdamW + LR schedule inside a DeepSpeed engine (ZeRO stage from the config)."""
        # Imported here, not at module top: importing DeepSpeed takes seconds and logs accelerator
        # detection, and the driver (which imports this module) never builds an engine.
        import deepspeed

        # A lock left by a killed process would hang deepspeed.initialize forever (see the module).
        deepspeed_ops.clear_stale_lock()
        cfg = self.cfg
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        scheduler = transformers.get_scheduler(
            SCHEDULERS[cfg.optim.scheduler], optimizer,
            num_warmup_steps=int(cfg.optim.warmup_ratio * self.total_steps),
            num_training_steps=max(1, self.total_steps))  # a zero-shot run (epochs 0) takes no step
        ds_config = {
            # Accumulation is ours (module docstring): DeepSpeed sees one micro-batch per step.
            "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size * self.accum,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.optim.effective_batch_size,
            "gradient_clipping": cfg.optim.max_grad_norm,
            "zero_optimization": {"stage": cfg.distributed.zero_stage},
            "bf16": {"enabled": next(model.parameters()).dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        t_ds = time.perf_counter()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.timing["deepspeed_init_s"] = time.perf_counter() - t_ds
        # Dropout masks differ across ranks (a checkpoint restores each rank's own RNG state).
        torch.manual_seed(cfg.optim.seed + 1 + self.rank)

    def _restore(self) -> bool:
        """Load the checkpoint to resume from, if any; returns whether one was loaded."""
        checkpoint = self._checkpoint_to_resume()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            self.state, self.best_adapter = checkpointing.load(Path(d), engine=self.engine, rank=self.rank)
        try:
            self.objective.load_state_dict(self.state.objective)
        except ValueError as err:
            raise TrainingError(f"checkpoint {checkpoint.path}: cannot resume its objective state: {err}") from err
        return True

    def _setup_tracking(self, resumed: bool) -> None:
        """Rank 0 opens (or, resumed, reopens) the MLflow run and records where the workers run;
        every rank learns the run id."""
        nodes = self._gather((ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()))
        if self.rank == 0:
            params = flatten(self.cfg.to_dict())
            params.update(self.task.mlflow_params())
            params.update({"derived.grad_accum_steps": self.accum, "derived.world_size": self.world,
                           "derived.steps_per_epoch": self.plan.steps_per_epoch})
            params.update(self.loop_config["mlflow"].get("params") or {})
            params["objective"] = describe_objective(params)
            self.logger = RunLogger.open(self.loop_config["mlflow"], run_dir=self.run_dir,
                                         run_id=self.state.mlflow_run_id, params=params)
            self.state.mlflow_run_id = self.logger.run_id
            # A restarted worker group may land elsewhere: the tags show the latest placement.
            self.logger.set_tags({TAG_WORKER_NODES: ",".join(n for n, _ in nodes),
                                  TAG_WORKER_IPS: ",".join(ip for _, ip in nodes)})
            if not resumed:
                # run_training writes it; a sweep trial's run_dir may not have it yet.
                cfg_file = self.run_dir / CONFIG_FILE
                if not cfg_file.is_file():
                    cfg_file.write_text(dump_yaml(self.cfg), force=True)
                self.logger.log_text(cfg_file.read_text(), CONFIG_FILE)
                self.logger.set_tags({TAG_NOTE: run_description(params, {k: len(v.rows) for k, v in self.splits.items()})})
                log_manifest_input(self.logger.tracking_uri, self.logger.run_id, self.cfg.data.manifest,
                                   run_manifest(self.cfg))
            else:  # the checkpoint step this attempt continues from (the redone steps are logged once: RunLogger)
                self.logger.log_metrics({"resumed_at_step": self.state.global_step}, step=self.state.global_step)
        self.state.mlflow_run_id = self._broadcast(self.state.mlflow_run_id)

    # ----------------------------------------------------------------------------- helpers
    def _checkpoint_to_resume(self) -> ray.train.Checkpoint | None:
        """Ray's latest registered checkpoint, or a newer complete one on local storage (see
        checkpointing.newest_on_disk); rank 0 decides so every rank loads the same one."""
        registered = ray.train.get_checkpoint()
        choice = None
        if self.rank == 0:
            choice = registered.path if registered is not None else None
            storage = ray.train.get_context().get_storage()
            exp_dir = Path(storage.experiment_fs_path)
            # Only a local (or NFS) store can hold a newer checkpoint Ray did not register.
            if isinstance(storage.storage_filesystem, pyarrow.fs.LocalFileSystem) and exp_dir.is_dir():
                newest = checkpointing.newest_on_disk(exp_dir, self.world)
                reg_step = -1
                if registered is not None and (Path(registered.path) / "trainer_state.json").is_file():
                    reg_step = TrainerState.from_json(
                        (Path(registered.path) / "trainer_state.json").read_text()).global_step
                if newest is not None and newest[1] > reg_step:
                    choice = str(newest[0])
        choice = self._broadcast(choice)
        if choice is None:
            return None
        if registered is not None and choice == registered.path:
            return registered
        return ray.train.Checkpoint.from_directory(choice)

    def _broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def _loader(self, dataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.collator,
                                           num_workers=self.cfg.data.num_loader_workers)

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg, st = self.cfg, self.state
        every = cfg.eval.every_steps
        self.progress.send("start", step=st.global_step, total_steps=self.total_steps,
                           steps_per_epoch=self.plan.steps_per_epoch, epochs=cfg.optim.epochs)
        while not st.done and st.epoch < cfg.optim.epochs:
            steps = self.plan.worker_micro_batches(st.epoch, self.rank, start_step=st.step_in_epoch)
            loader = iter(self._loader(self.splits["train"].features, [mb for step in steps for mb in step]))
            for _ in steps:
                t0 = time.perf_counter()
                res = self.optimizer_step([next(loader) for _ in range(self.accum)])
                st.global_step += 1
                st.step_in_epoch += 1
                self.timing["train_s"] += time.perf_counter() - t0
                self._log_step(res)
                self.progress.send("step", step=st.global_step, epoch=st.epoch, loss=float(res.total.detach()),
                                   lam=self.objective.log_values().get("lambda"))
                self.faults.after_step(st.global_step)
                if every and st.global_step % every == 0:
                    self.evaluate_and_checkpoint()
                    if st.done:
                        return
            st.epoch += 1
            st.step_in_epoch = 0
            # Per-epoch evaluation, or the last one of a step-wise schedule that did not land on the end.
            if not every or (st.epoch == cfg.optim.epochs and st.global_step % every):
                self.evaluate_and_checkpoint()
        st.done = True

    def optimizer_step(self, micro_batches: list[dict], *, plain_mean: bool = False):
        """One optimizer step over this worker's micro-batches (the objective sees all of them at once).

        plain_mean=True backpropagates the local mean loss instead of the objective (benchmark baseline).
        """
        self.engine.train()
        losses, stratum, attribute, utt_ids = [], [], [], []
        for batch in micro_batches:
            dev_batch = to_device(batch, self.device)
            losses.append(per_sample_loss(self.engine, dev_batch))
            stratum.append(dev_batch["stratum"])
            attribute.append(dev_batch["attribute"])
            utt_ids += batch["utt_id"]
        losses_t = self.faults.poison(torch.cat(losses), self.state.global_step + 1)
        if plain_mean:
            loss = losses_t.mean()
            self.engine.backward(loss)
            self.engine.step()
            return loss
        try:
            res = self.objective(losses_t, torch.cat(stratum), torch.cat(attribute))
        except TrainingError:  # raised on every rank alike: the bad-loss count is all-reduced
            self._non_finite(losses_t, utt_ids)
        self.engine.backward(res.total)
        self.engine.step()
        self.objective.after_step(res)
        return res

    def _log_step(self, res: ObjectiveOutput) -> None:
        coverage = self.coverage.add(res.stats.counts.cpu(), res.stats.valid.cpu(), self.objective.grid.train_counts > 0)
        self.state.batch_coverage = asdict(self.coverage)
        if self.logger is None:
            return
        row = {"train/loss": float(res.total.detach()), "train/erm": res.erm, "train/gap": res.gap,
               **self.objective.log_values(), "lr": self.scheduler.get_last_lr()[0]}
        row.update(self.strata.named("train/gap_", res.stratum_gaps))
        row.update({f"train/{k}": v for k, v in coverage.items()})
        self.logger.log_metrics(row, step=self.state.global_step)

    def _non_finite(self, losses: torch.Tensor, utt_ids: list[str]) -> None:
        """Stop every rank together, naming the step and the utterances whose loss is NaN/inf."""
        bad_local = [u for u, ok in zip(utt_ids, torch.isfinite(losses.detach()).tolist()) if not ok]
        bad = [u for part in self._gather(bad_local) for u in part]
        raise TrainingError(f"non-finite training loss at optimizer step {self.state.global_step + 1} "
                             f"(epoch {self.state.epoch}); utterances with NaN/inf loss: {', '.join(bad)}")

    # ----------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def predict(self, split: str) -> pd.DataFrame:
        """Loss, label scores and prediction for every row of `split`, sharded over workers and gathered.

        Returns one row per utterance (manifest order) on every rank.
        """
        data = self.splits[split]
        self.engine.eval()
        rows = []
        for chunk in shard_for_eval(data.base.lengths, rank=self.rank, num_workers=self.world,
                                    batch_size=self.cfg.eval.batch_size):
            batch = to_device(self.collator([data.features[i] for i, _ in chunk]), self.device)
            scores = score_labels(self.engine, batch).float()
            loss = answer_loss_from_scores(scores, batch).cpu()
            scores = scores.cpu()
            for j, (i, keep) in enumerate(chunk):
                if keep:
                    rows.append((i, float(loss[j]), scores[j].tolist()))
        gathered = sorted((r for part_rows in self._gather(rows) for r in part_rows), key=lambda r: r[0])
        task = self.task
        scores = np.array([r[2] for r in gathered], dtype=np.float64).reshape(len(gathered), task.num_labels)
        part = data.rows
        frame = predictions_frame(part["utt_id"], None, part[task.attribute], part["emotion"],
                                  scores.argmax(1) if len(gathered) else [], scores=scores,
                                  modality=self.cfg.data.modality, task=task,
                                  columns={c: part[c] for c in task.stratum if c != RUN_MODALITY})
        frame["loss"] = [r[1] for r in gathered]  # per-sample dev loss (for Δdev), not written to PREDS.csv
        return frame

    def split_metrics(self, frame: pd.DataFrame, prefix: str) -> dict[str, float]:
        """The paper's metrics of a predictions frame, plus Δ (the objective's loss gap) per stratum.
        `worst_lang_gap` is the largest per-stratum AVG gap (per language in the paper's task)."""
        task = self.task
        m = compute_metrics(_preds_only(frame), task)
        stratum, attribute = self._cells(frame)
        loss_gap, stratum_gaps = dev_gap(torch.tensor(frame["loss"].to_numpy()), stratum, attribute,
                                         num_strata=self.strata.num, num_attrs=len(task.attribute_values))
        per = m[per_key(task)]
        lang_gaps = {lg: v["avg_gap"] for lg, v in per.items()}
        finite = [v for v in lang_gaps.values() if v == v]
        out = {
            f"{prefix}_w_f1": m["overall"]["w_f1"], f"{prefix}_acc": m["overall"]["acc"],
            f"{prefix}_avg_gap": m["overall"]["avg_gap"],
            f"{prefix}_worst_lang_gap": max(finite) if finite else float("nan"),
            f"{prefix}_loss": float(frame["loss"].mean()), f"{prefix}_loss_gap": float(loss_gap),
        }
        for lg, v in lang_gaps.items():
            out[f"{prefix}_avg_gap_{lg}"] = v
            out[f"{prefix}_w_f1_{lg}"] = per[lg]["w_f1"]
        out.update(self.strata.named(f"{prefix}_loss_gap_", stratum_gaps))
        return out

    def _cells(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """Stratum and attribute index (the task's orders) of each row of a manifest or predictions frame."""
        task = self.task
        stratum = torch.from_numpy(task.stratum_codes(frame, self.cfg.data.modality))
        return stratum, torch.from_numpy(task.attribute_codes(frame[task.attribute]))

    def update_objective(self, metrics: dict[str, float]) -> None:
        """The objective's per-evaluation update on this evaluation's Δdev (`lambda.dev_gap`): MinMaxGAP's
        λ ← clip(λ + η(Δdev − ε), 0, λmax). Every rank holds the same gathered dev set, so the state stays
        identical everywhere."""
        kind = self.cfg.lam.dev_gap
        drive = lambda_drive(kind, loss_gap=metrics["dev_loss_gap"], avg_gap_percent=metrics["dev_avg_gap"])
        if drive is None:
            warnings.warn(f"evaluation {self.state.eval_round}: the dev gap lambda.dev_gap={kind} is undefined (NaN); "
                          f"the objective's update (λ) is skipped this evaluation", ErmgapWarning, stacklevel=2)
            return
        self.objective.after_eval(drive)

    def track_best(self, score: float) -> None:
        """Keep the best adapter so far and count evaluations without improvement (early stopping)."""
        cfg, st = self.cfg, self.state
        better = score == score and (st.best_score is None or
                                     (score > st.best_score if cfg.eval.metric_mode == "max" else score < st.best_score))
        if better:
            st.best_score, st.best_round, st.bad_rounds = float(score), st.eval_round, 0
            self.best_adapter = checkpointing.adapter_state(self.engine.module, cfg.distributed.zero_stage)
        else:
            st.bad_rounds += 1
        if (cfg.eval.patience and st.bad_rounds >= cfg.eval.patience) or st.epoch >= cfg.optim.epochs:
            st.done = True

    def evaluate_and_checkpoint(self) -> None:
        """Dev evaluation → objective update (λ) → best/early-stopping bookkeeping → checkpoint + report."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        metrics = self.split_metrics(self.predict("dev"), "dev")
        self.timing["eval_s"] += time.perf_counter() - t0
        st.eval_round += 1
        self.update_objective(metrics)
        self.track_best(metrics[f"dev_{cfg.eval.metric}"])
        metrics.update({
            "eval_round": st.eval_round, "epoch": st.epoch + st.step_in_epoch / max(1, self.plan.steps_per_epoch),
            "step": st.global_step, **self.objective.log_values(),
            f"best_dev_{cfg.eval.metric}": st.best_score if st.best_score is not None else float("nan"),
            "best_eval_round": st.best_round, "mlflow_run_id": st.mlflow_run_id, "done": False,
            "stopped_early": bool(st.done and st.epoch < cfg.optim.epochs),
        })
        st.objective = self.objective.state_dict()
        st.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
        if self.logger is not None:
            self.logger.log_metrics({f"{EVAL}{k}": v for k, v in metrics.items() if k not in ("eval_round", "step")},
                                    step=st.global_step)
        self.progress.send("eval", round=st.eval_round, step=st.global_step,
                           lam=self.objective.log_values().get("lambda"),
                           metrics={k: metrics[k] for k in ("dev_w_f1", "dev_worst_lang_gap", "dev_loss_gap")},
                           metric=cfg.eval.metric, best=st.best_score, best_round=st.best_round)
        self.save_checkpoint(metrics)

    # ----------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"ermgap-ckpt-r{self.rank}-"))
        checkpointing.save(tmp, engine=self.engine, rank=self.rank, zero_stage=self.cfg.distributed.zero_stage,
                           state=self.state, best_adapter=self.best_adapter)
        ray.train.report(json_safe(metrics, nan_to_none=False), checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
        self.timing["checkpoint_s"] += time.perf_counter() - t0

    # ----------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Best adapter → dev and test predictions → CSVs, MLflow, final report (done=True)."""
        cfg, st = self.cfg, self.state
        if self.best_adapter is not None:
            checkpointing.apply_adapter_state(self.engine.module, self.best_adapter, cfg.distributed.zero_stage)
        self.progress.send("phase", text=f"final evaluation: best checkpoint (eval {st.best_round}) on dev and test")
        t0 = time.perf_counter()
        dev, test = self.predict("dev"), self.predict("test")
        self.timing["eval_s"] += time.perf_counter() - t0
        final = self.split_metrics(dev, "dev")
        if len(test):
            final.update(self.split_metrics(test, "test"))
        final.update({f"train_{k}": v for k, v in self.coverage.summary().items()})
        final.update({
            "eval_round": st.eval_round, "epoch": float(st.epoch), "step": st.global_step,
            **self.objective.log_values(), f"best_dev_{cfg.eval.metric}": st.best_score,
            "best_dev_w_f1": final["dev_w_f1"], "best_eval_round": st.best_round,
            "mlflow_run_id": st.mlflow_run_id, "done": True,
            "stopped_early": st.epoch < cfg.optim.epochs,
        })
        cache_stats = self._feature_cache_stats()
        if self.rank == 0:
            self._write_outputs(final, dev, test, cache_stats)
        st.objective = self.objective.state_dict()
        self.save_checkpoint(final)
        if self.logger is not None:
            self.logger.end("FINISHED")
        return final

    def _feature_cache_stats(self) -> dict[str, Any] | None:
        """All ranks' cache hits, misses and encoder seconds, summed (None when the cache is off)."""
        if self.feature_cache is None:
            return None
        return CacheStats.total(self._gather(self.feature_cache.stats)).to_dict()

    def _write_outputs(self, final: dict[str, Any], dev: pd.DataFrame, test: pd.DataFrame,
                       cache_stats: dict[str, Any] | None) -> None:
        """Rank 0: predictions, metrics.json and the best adapter in the run directory (written locally
        and uploaded when it is on object storage) and in MLflow."""
        st, lg = self.state, self.logger
        with self.run_dir.staged() as out:
            for name, frame in (("dev_preds.csv", dev), ("test_preds.csv", test)):
                with atomic_path(out / name, force=True) as tmp:
                    _preds_only(frame).to_csv(tmp, index=False)
            with atomic_path(out / METRICS_FILE, force=True) as tmp:
                tmp.write_text(json.dumps({**json_safe(final, nan_to_none=False), **self.objective.outputs(),
                                           "history": st.history, "timing": self.timing,
                                           "feature_cache": cache_stats}, indent=1))
            if self.best_adapter is not None:
                checkpointing.save_adapter(self.engine.module, self.best_adapter, out / "adapter")
            lg.log_metrics({f"{BEST}{k}": v for k, v in final.items() if k.startswith(("dev_", "test_"))}
                           | {f"{BEST}eval_round": st.best_round}, step=st.global_step)
            lg.log_metrics({f"train_{k}": final[f"train_{k}"] for k in RUN_COVERAGE}, step=st.global_step)
            if cache_stats is not None:
                lg.log_metrics({f"feature_cache/{k}": v for k, v in cache_stats.items()}, step=st.global_step)
            lg.log_artifact(out / "dev_preds.csv", "predictions")
            lg.log_artifact(out / "test_preds.csv", "predictions")
            lg.log_artifact(out / METRICS_FILE)
            if (out / "adapter").is_dir():
                lg.log_artifact(out / "adapter", "adapter")
        lg.set_tags({"ermgap.stopped_early": final["stopped_early"], "ermgap.best_eval_round": st.best_round})

    def cleanup(self) -> None:
        self.__dict__.pop("engine", None)  # absent when setup failed before building it
        gc.collect()


def _preds_only(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["loss"])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring for the order of the steps)."""
    recipe = LoRARecipe()
    try:
        recipe.setup(loop_config)
        if not recipe.state.done:
            recipe.train()
        recipe.finish()
    except ErmgapError as err:
        # A user error: recorded for the driver, which ends the run without Ray's retry (ermgap.failures).
        record_error(loop_config["run_dir"], err, ray.train.get_context().get_world_rank())
        raise
    finally:
        recipe.cleanup()


# =============================================================================== driver side


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree whose local data and model paths are absolute: trials and Ray workers
    start in other directories than the driver, whose CWD relative paths refer to."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    data, model = out.get("data") or {}, out.get("model") or {}
    if data.get("manifest") and not os.path.isabs(data["manifest"]):
        data["manifest"] = str(Path(data["manifest"]).resolve())
    if data.get("feature_cache") not in (None, "", "off", False) and "://" not in str(data["feature_cache"]):
        data["feature_cache"] = str(Path(data["feature_cache"]).expanduser().resolve())
    name = model.get("name_or_path")
    if name and Path(name).expanduser().exists():
        model["name_or_path"] = str(Path(name).expanduser().resolve())
    return out


def resolved_config(cfg: RunConfig) -> RunConfig:
    """The config as shipped to workers: absolute local paths, the tracking URI and storage path fixed."""
    tree = absolute_paths(cfg.to_dict())
    if not tree["tracking"]["tracking_uri"]:
        tree["tracking"]["tracking_uri"] = default_tracking_uri(cfg)
    if "://" not in tree["tracking"]["storage_path"]:
        tree["tracking"]["storage_path"] = str(Path(tree["tracking"]["storage_path"]).resolve())
    return config_from_dict(tree, source="resolved config")


def run_manifest(cfg: RunConfig, *, check_audio: bool = False) -> pd.DataFrame:
    """The run's manifest rows (validated for its task; coverage warnings logged), `data.languages` applied.
    check_audio: also open every audio file (the driver's pre-flight)."""
    df = read_manifest(cfg.data.manifest, task=TaskSpec.from_config(cfg), modality=cfg.data.modality,
                       allow_warnings=True, check_audio=check_audio)
    if cfg.data.languages:
        if "language" not in df.columns:
            raise ConfigError(f"data.languages: {cfg.data.manifest} has no 'language' column to restrict")
        df = df[df["language"].isin(cfg.data.languages)]
    return df


def resolve_task(cfg: RunConfig, df: pd.DataFrame | None = None) -> Task:
    """The run's Task from its config and manifest (see ermgap.task for the order rules)."""
    df = run_manifest(cfg) if df is None else df
    return Task.from_config(cfg, df, file=cfg.data.manifest)


def with_task(cfg: RunConfig, task: Task) -> RunConfig:
    """`cfg` declaring `task` explicitly (data.labels in class order, data.attribute_values), so that the
    run's config.yaml, its MLflow params and a later `evaluate --config` reproduce the same indices."""
    tree = cfg.to_dict()
    declared = tree["data"]["labels"]
    if isinstance(declared, dict):
        tree["data"]["labels"] = dict(zip(task.labels, task.verbalizers))
    else:
        tree["data"]["labels"] = list(task.labels)
    tree["data"]["attribute_values"] = list(task.attribute_values)
    return config_from_dict(tree, source="resolved config")


def build_trainer(cfg: RunConfig, *, run_dir: str | os.PathLike | Location, name: str,
                  storage_path: str | os.PathLike | Location, callbacks=(), mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None,
                  resume: bool = False, fault: dict | None = None, progress=None,
                  mlflow_params: dict | None = None, entry_point: str = "ermgap train") -> TorchTrainer:
    """A TorchTrainer for one run. Re-running it with the same storage_path + name resumes from the
    latest checkpoint (Ray Train V2 restores the run's checkpoint manager from storage).
    progress: a `ProgressBox` actor handle rank 0 reports its steps to (ermgap.progress), or None.
    mlflow_params: extra params of the MLflow run (a sweep trial's `variant`); `entry_point` and the git
    commit become the run's source tags. Both locations may be local/NFS directories or s3:// / gs://
    prefixes (ermgap.storage)."""
    run_loc = Location.of(run_dir)
    cfg = resolved_config(cfg)
    task = resolve_task(cfg)
    cfg = with_task(cfg, task)
    loop_config = {
        "config": cfg.to_dict(),
        "task": task.to_dict(),
        "run_dir": run_loc,  # a Location: an object store's endpoint travels with it
        "feature_cache": _feature_cache_location(cfg, storage_path),
        "mlflow": {"tracking_uri": default_tracking_uri(cfg), "experiment": cfg.tracking.experiment,
                   "run_name": cfg.tracking.run_name or name, "parent_run_id": mlflow_parent_run_id,
                   "tags": {**source_tags(entry_point), **(mlflow_tags or {})}, "params": dict(mlflow_params or {})},
        # Fault injection is for local test runs: its marker is a local file.
        "fault": {**(fault or {}), "marker": None if run_loc.is_remote else str(run_loc.local / ".fault_fired")},
        "resume": resume,
        "progress": progress,
    }
    d = cfg.distributed
    storage, storage_fs = Location.of(storage_path).ray_storage()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker},
                                     placement_strategy=d.placement_strategy),
        run_config=RayRunConfig(
            name=name, storage_path=storage, storage_filesystem=storage_fs,
            # Retries are fit_run's (ermgap.failures): Ray's would retry user errors too.
            failure_config=FailureConfig(max_failures=0),
            # The latest checkpoint is what resumes; the best adapter travels inside every checkpoint.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks)),
    )


def _feature_cache_location(cfg: RunConfig, storage_path) -> Path | Location | None:
    """cache_dir(cfg), on an object store with the run storage's S3 endpoint: this process may be a sweep's
    trial driver on a node without $AWS_ENDPOINT_URL, but the storage Location carries the sweep driver's."""
    where = cache_dir(cfg)
    if isinstance(where, Location):
        where = Location.of(where.uri, endpoint=Location.of(storage_path).endpoint or where.endpoint)
    return where


def check_inputs(cfg: RunConfig) -> None:
    """Everything that can be checked before a Ray worker starts (errors name the key and value)."""
    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        raise ConfigError(f"data.manifest: {manifest} does not exist (generate one with `ermgap data synth`)")
    check_model(cfg.model)  # a missing local path, a folder that is not Qwen2-Audio, no processor
    if cfg.eval.metric not in SPLIT_METRICS:
        raise ConfigError(f"eval.metric: {cfg.eval.metric!r} is not a dev metric; allowed: {', '.join(SPLIT_METRICS)}")
    # Every audio file is opened once here (header + first frames; float files whole, for NaN/inf): a file
    # that cannot be decoded would otherwise fail inside a worker, after Ray's retries.
    df = run_manifest(cfg.model_copy(update={"data": cfg.data.model_copy(update={"languages": None})}),
                      check_audio=True)
    if cfg.data.languages:
        present = sorted(set(df["language"]))
        unknown = sorted(set(cfg.data.languages) - set(present))
        if unknown:
            raise ConfigError(f"data.languages: {unknown} not in {manifest}; it has: {present}")
        df = df[df["language"].isin(cfg.data.languages)]
    task = resolve_task(cfg, df)
    n_train, n_dev = int((df["split"] == "train").sum()), int((df["split"] == "dev").sum())
    if n_train < cfg.optim.effective_batch_size:
        raise ConfigError(f"optim.effective_batch_size ({cfg.optim.effective_batch_size}) is larger than the train "
                          f"split of {manifest} ({n_train} utterances): not one optimizer step per epoch")
    if n_dev == 0:
        raise ManifestError(f"{manifest}: no dev rows; dev evaluation drives λ and early stopping")
    if cfg.data.sampler == "stratified":
        check_stratified(cfg, task, df[df["split"] == "train"])


def check_stratified(cfg: RunConfig, task: Task, train: pd.DataFrame) -> None:
    """data.sampler=stratified: the quotas of every train cell must fit in one global batch."""
    cells, counts = np.unique(task.cell_codes(train, cfg.data.modality), return_counts=True)
    try:
        cell_quotas(dict(zip(cells.tolist(), counts.tolist())), batch=cfg.optim.effective_batch_size,
                    min_per_cell=cfg.data.min_per_cell)
    except ValueError:
        names = [f"{s}_{a}" for s in task.stratum_values for a in task.attribute_values]
        raise ConfigError(
            f"data.min_per_cell: {cfg.data.min_per_cell} rows of each of the {len(cells)} (stratum, attribute) cells "
            f"in the train split of {cfg.data.manifest} ({', '.join(names[c] for c in cells)}) need "
            f"{cfg.data.min_per_cell * len(cells)} slots, but optim.effective_batch_size is "
            f"{cfg.optim.effective_batch_size}; expected data.min_per_cell ≤ "
            f"{cfg.optim.effective_batch_size // len(cells)} or a larger batch") from None


def check_cluster_gpus(cfg: RunConfig, where: str = "the Ray cluster") -> None:
    """With distributed.use_gpu, the connected cluster must have a GPU per worker (checked after joining
    it: the driver's own machine, e.g. a CPU-only login node, says nothing about the cluster's GPUs)."""
    if not cfg.distributed.use_gpu:
        return
    need, have = cfg.distributed.num_workers, ray.cluster_resources().get("GPU", 0.0)
    if have < need:
        raise ConfigError(f"distributed.use_gpu is true and distributed.num_workers={need} needs {need} GPU(s), but "
                          f"{where} has {have:g}; lower distributed.num_workers, join a cluster with GPUs "
                          "(--address), or set distributed.use_gpu=false")


def _step_from_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be an integer step, got {raw!r}") from None


def _run_config(run_path: Location) -> RunConfig:
    """A run's saved config.yaml (a local file, or an object under an s3:// / gs:// run prefix)."""
    if not run_path.is_remote:
        return load_config(run_path.local / CONFIG_FILE)
    return config_from_dict(yaml.safe_load((run_path / CONFIG_FILE).read_text()) or {},
                            source=str(run_path / CONFIG_FILE))


def faults_from_env() -> dict[str, int | None]:
    """The test-only FaultInjector spec from $ERMGAP_FAULT_* (read by the drivers: `run_training`, `run_sweep`)."""
    return {"kill_at_step": _step_from_env(FAULT_ENV), "nan_at_step": _step_from_env(NAN_ENV)}


def run_training(cfg: RunConfig, *, address: str | None = None, resume_dir: str | os.PathLike | None = None,
                 run_dir: str | os.PathLike | None = None, force: bool = False, num_cpus: int | None = None,
                 mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None,
                 console: Console | None = None, verbose: bool = False,
                 allow_local_paths: bool = False) -> dict[str, Any]:
    """Train one model and return its final metrics (the `done=True` report; also in RUN_DIR/metrics.json).

    Progress (rank 0's steps and evaluations) is shown on `console` (default: stdout) while it runs;
    `verbose` lets worker output (DeepSpeed, transformers, Ray Train) through to this process when
    this call starts the Ray connection.

    resume_dir: continue the run in that directory (its config.yaml is used, `cfg` is ignored).
    run_dir: where the run lives (default: <tracking.storage_path>/<timestamp>-<run_name or 'train'>).
    Both may be local/NFS directories or s3:// / gs:// prefixes (ermgap.storage).
    allow_local_paths: on a Ray cluster of more than one node, accept a directory run_dir and a sqlite/file
    tracking URI (NFS mounted at the same path on every node; ermgap.multinode).
    force: replace an existing run directory. Everything is validated first; only a directory ermgap
    created is replaced (io.OWNER_MARKER); the old one is moved aside and deleted once the new run
    has finished, and moved back if the new one fails before training starts (an s3:// / gs:// prefix
    cannot be moved: ermgap's old one is deleted once the checks passed).
    """
    aside = None
    if resume_dir is not None:
        run_path = Location.of(resume_dir)
        if not (run_path / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume_dir}: not a run directory (no {CONFIG_FILE})")
        cfg = _run_config(run_path)
        if (run_path / METRICS_FILE).is_file():  # finished already: nothing to resume
            final = json.loads((run_path / METRICS_FILE).read_text())
            return {**final, "run_dir": str(run_path), "tracking_uri": default_tracking_uri(cfg)}
        check_inputs(cfg)
        cfg = with_task(cfg, resolve_task(cfg))
    else:
        cfg = resolved_config(cfg)
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Location.of(cfg.tracking.storage_path) / f"{stamp}-{cfg.tracking.run_name or 'train'}"
        run_path = Location.of(run_dir)
        if (run_path.is_file() or run_path.list()) and not force:
            raise ConfigError(f"run directory {run_path} already exists; pass --force to replace it "
                              f"or --resume {run_path} to continue it")
        check_inputs(cfg)  # before anything on disk changes
        cfg = with_task(cfg, resolve_task(cfg))
    uri = default_tracking_uri(cfg)
    run_path.check_reachable("the driver")
    check_server(uri, "the driver")
    if resume_dir is None and force:
        aside = run_path.set_aside("run directory")
    fault = faults_from_env()
    try:
        run_path.claim("a training run")
        if resume_dir is None:
            (run_path / CONFIG_FILE).write_text(dump_yaml(cfg), force=True)
        ensure_ray(address, num_cpus=num_cpus, log_to_driver=verbose)
        check_cluster_gpus(cfg, f"the Ray cluster at {address}" if address else "the local Ray cluster")
        check_shared_paths(storage=str(run_path), tracking_uri=uri, inputs=input_paths(cfg),
                           allow_local_paths=allow_local_paths)
        close_orphaned_runs(uri, cfg.tracking.experiment)
        box = ProgressBox.remote()
        make_trainer = partial(build_trainer, cfg, run_dir=run_path, name=run_path.name, storage_path=run_path.parent,
                               mlflow_parent_run_id=mlflow_parent_run_id,
                               mlflow_tags={**(mlflow_tags or {}), **driver_tag()},
                               resume=resume_dir is not None, fault=fault, progress=box)
        first = [make_trainer()]  # built here, so that an error in it brings the replaced run back
    except BaseException:
        restore_aside(aside, str(run_path))  # nothing was trained: the replaced run comes back as it was
        raise
    kept = f"; the run it replaced is kept at {aside}" if aside is not None else ""
    try:
        with TrainProgress(box, console or Console()):
            fit_run(lambda: first.pop() if first else make_trainer(), run_dir=run_path, tracking_uri=uri,
                    max_failures=cfg.distributed.max_failures)
    except KeyboardInterrupt:
        mark_run(uri, run_path, "KILLED")
        raise
    except ErmgapError as err:  # a user error in a worker: retrying or resuming would meet it again
        raise type(err)(f"{err} (run directory {run_path}{kept})") from None
    except RunFault as fault:
        err = fault.cause
        raise TrainingError(f"training failed ({type(err).__name__}, {fault.attempts} attempt(s)); run directory "
                            f"{run_path}; continue with `ermgap train --resume {run_path}`{kept}:\n{err}") from err
    discard_aside(aside)
    metrics_file = run_path / METRICS_FILE
    if not metrics_file.is_file():
        raise TrainingError(f"training ended without final metrics ({metrics_file} missing)")
    final = json.loads(metrics_file.read_text())
    final["run_dir"] = str(run_path)
    final["tracking_uri"] = uri
    return final


__all__ = ["LoRARecipe", "Strata", "absolute_paths", "build_trainer", "check_inputs", "resolve_task",
           "resolved_config", "run_manifest", "run_training", "train_loop_per_worker", "with_task"]
