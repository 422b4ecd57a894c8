"""The training recipe every Ray Train worker runs: LoRA fine-tuning with the run's objective under DeepSpeed.

Read it top to bottom (torchtune style, no Trainer base class); the driver is ermgap.driver:

    train_loop_per_worker        setup → train → finish → cleanup
        LoRARecipe.setup           model + LoRA → data (ermgap.run_data) → objective → engine (ermgap.engine)
                                   → _restore (checkpoint) → _setup_tracking (MLflow, rank 0)
        LoRARecipe.train           epochs of optimizer_step; evaluate_and_checkpoint each epoch (or every N steps)
        LoRARecipe.optimizer_step  per-sample losses of all micro-batches → objective (the all-reduce) → backward
                                   → objective.after_step (per-step state)
        LoRARecipe.evaluate_and_checkpoint   dev metrics (predict → split_metrics) → objective.on_evaluation
                                   → track_best
                                   → save_checkpoint (ray.train.report)
        LoRARecipe.finish          best adapter → dev/test predictions, final report
        LoRARecipe.cleanup

The objective is `objective.kind` (ermgap.objectives: erm, minmaxgap, group_dro, reweight), built once in
setup over the train split's stratum × gender cells. Where the distributed reduction happens: only inside
the objective's `ermgap.objectives.cells.reduced_cell_stats` (cell loss sums/counts all-reduced with autograd)
and DeepSpeed's gradient averaging.

Gradient accumulation is done at the LOSS level, not by DeepSpeed: the objective's worst-language
gap is a non-linear function of group means over the whole effective batch (the paper's
mini-batch estimate), so per-micro-batch gaps summed over accumulation steps are a different
(biased) estimator. Each optimizer step therefore runs the forward of all its micro-batches,
keeps their per-sample losses (graphs alive), concatenates them, evaluates the objective once and
calls backward once (ermgap.engine configures DeepSpeed for that). Cost: activation memory of `accum`
micro-batches (use gradient checkpointing on GPU, or more workers). With this, a run with W workers and
accumulation A equals one with W' workers and A' whenever W·A·micro is the same
(tests/test_train_distributed.py checks 2 workers vs 1 worker).

Data: the batch plan of `data.sampler` (`ermgap.sampler`: GlobalBatchPlan, seeded per epoch and
length-grouped; StratifiedBatchPlan, a fixed quota of every train cell per step, with the ERM weights that
keep the ERM term a population mean) fixes which utterances form each optimizer step independently of
the worker count; see that module's docstring for why not Ray Data.

Fault tolerance: every evaluation writes a checkpoint (ermgap.checkpointing: DeepSpeed state
without frozen weights, best LoRA adapter, the objective's state, data position, per-rank RNG, MLflow run id) through
`ray.train.report`. A restarted worker group or `ermgap train --resume RUN_DIR`
(same storage_path + name: Ray Train V2 reloads the run's checkpoint manager) loads it and
continues at the same step with the same data order and RNG, so on CPU the result equals an
uninterrupted run. A worker's user error ends the run without a retry, faults are retried: ermgap.failures.
Tests inject faults through a `StepHook` passed in the loop config (tests/_faults.py); the recipe only
calls it.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import ray.train.torch
import torch
import transformers

from ermgap import checkpointing
from ermgap.batching import EmotionCollator, to_device
from ermgap.checkpointing import TrainerState
from ermgap.config import config_from_dict
from ermgap.engine import build_engine
from ermgap.errors import ConfigError, ErmgapError, TrainingError
from ermgap.failures import record_error
from ermgap.feature_cache import CacheStats
from ermgap.formatting import json_safe
from ermgap.io import full_store_error, no_space_reported
from ermgap.model import apply_lora, load_backbone
from ermgap.objectives import CellGrid, Objective, ObjectiveOutput, build_objective, register_objective
from ermgap.preflight import run_manifest
from ermgap.progress import ProgressSender
from ermgap.run_data import (
    Strata,
    cell_indices,
    load_splits,
    objective_metrics,
    open_feature_cache,
    predict_split,
    split_metrics,
)
from ermgap.run_outputs import open_run_logger, write_outputs
from ermgap.sampler import BatchCoverage, StratifiedBatchPlan, build_plan
from ermgap.scoring import FORWARD_INPUTS, causal_lm, per_sample_loss
from ermgap.storage import Location
from ermgap.task import Task
from ermgap.tracking import EVAL, RunLogger
from ermgap.worker import WorkerGroup


class StepHook:
    """What every worker calls at each optimizer step, passed through the loop config (`build_trainer(
    step_hook=...)`): `losses` sees this rank's per-sample losses of step `step` before the objective and
    returns the ones to use; `after_step` runs once step `step` has been taken. The recipe does not know
    what a hook does (tests inject faults with one: tests/_faults.py). This base class does nothing."""

    def losses(self, recipe: LoRARecipe, step: int, losses: torch.Tensor) -> torch.Tensor:
        return losses

    def after_step(self, recipe: LoRARecipe, step: int) -> None:
        pass


class LoRARecipe:
    """One worker's view of a training run. Methods run in the order they are listed."""

    # ----------------------------------------------------------------------------- setup
    def setup(self, loop_config: dict[str, Any]) -> None:
        t_setup = time.perf_counter()
        self.loop_config = loop_config
        if loop_config.get("objective_class") is not None:  # before the config names its kind
            register_objective(loop_config["objective_class"])
        self.cfg = cfg = config_from_dict(loop_config["config"], source="loop_config")
        self.run_dir = Location.of(loop_config["run_dir"])
        self.group = WorkerGroup.current()
        self.rank, self.world = self.group.rank, self.group.world
        self.group.check_services(self.run_dir, loop_config["mlflow"]["tracking_uri"])
        self.accum = cfg.optim.effective_batch_size // (cfg.optim.micro_batch_size * self.world)
        # Resolved once on the driver (ermgap.driver.build_trainer): every rank, split and evaluation uses these indices.
        self.task = Task.from_dict(loop_config["task"])
        self.strata = Strata.from_task(self.task)
        self.step_hook: StepHook = loop_config.get("step_hook") or StepHook()
        self.progress = ProgressSender(loop_config.get("progress"), rank=self.rank)
        self.state = TrainerState()
        self.best_adapter: dict[str, torch.Tensor] | None = None
        self.logger: RunLogger | None = None
        self.timing = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0}

        model, processor = self._setup_model()
        self._setup_data(processor, model)
        self.objective = self._build_objective()
        self._setup_engine(model)
        resumed = self._restore()
        self.coverage = BatchCoverage(**self.state.batch_coverage)
        self._setup_tracking(resumed)
        self.timing["setup_s"] = time.perf_counter() - t_setup

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
        self.feature_cache = open_feature_cache(self.loop_config["feature_cache"], cfg, model, processor)
        # Kept for _setup_tracking (the run's MLflow input): read once per worker.
        self.manifest = run_manifest(cfg)
        self.splits = load_splits(self.manifest, cfg, task, processor, model, cache=self.feature_cache,
                                  rank=self.rank, world=self.world, device=self.device)
        self.collator = EmotionCollator(processor, cfg.prompt, cfg.data.modality, sample_rate=cfg.data.sample_rate,
                                        task=task)
        train = self.splits["train"]
        self.plan = build_plan(cfg, train.base.lengths, task.cell_codes(train.rows, cfg.data.modality),
                               num_workers=self.world, accum=self.accum)
        self.total_steps = cfg.optim.epochs * self.plan.steps_per_epoch

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
        """AdamW + LR schedule inside a DeepSpeed engine (ermgap.engine), over the LoRA weights and the
        objective's own parameters if it has any."""
        text = causal_lm(model).config.get_text_config()
        layer = self.objective.hidden_layer
        if not -1 <= layer <= text.num_hidden_layers:
            raise ConfigError(f"objective.kind={self.objective.kind} reads hidden layer {layer}, but the language model "
                              f"has hidden states 0..{text.num_hidden_layers} (0: the embeddings) and -1 (the last)")
        own = self.objective.module(text.hidden_size)
        lr_scales = {}
        if own is not None:
            model.add_module(checkpointing.OBJECTIVE_MODULE, own.to(self.device))
            lr_scales[checkpointing.OBJECTIVE_MODULE] = self.objective.module_lr_scale
        unknown = set(self.objective.forward_inputs) - set(FORWARD_INPUTS)
        if unknown:
            raise TrainingError(f"objective.kind={self.objective.kind} needs forward inputs {sorted(unknown)}; "
                                f"the recipe provides {list(FORWARD_INPUTS)}")
        self.engine, self.scheduler, self.timing["deepspeed_init_s"] = build_engine(
            model, self.cfg, accum=self.accum, total_steps=self.total_steps, lr_scales=lr_scales)
        # Dropout masks differ across ranks (a checkpoint restores each rank's own RNG state).
        torch.manual_seed(self.cfg.optim.seed + 1 + self.rank)

    def _restore(self) -> bool:
        """Load the checkpoint to resume from, if any; returns whether one was loaded."""
        checkpoint = self.group.checkpoint_to_resume()
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
        """Rank 0 opens (or, resumed, reopens) the MLflow run (ermgap.run_outputs); every rank learns its id."""
        nodes = self.group.placement()
        if self.rank == 0:
            self.logger = open_run_logger(
                self.loop_config["mlflow"], run_dir=self.run_dir, run_id=self.state.mlflow_run_id, cfg=self.cfg,
                task=self.task, nodes=nodes, split_sizes={k: len(v.rows) for k, v in self.splits.items()},
                derived={"derived.grad_accum_steps": self.accum, "derived.world_size": self.world,
                         "derived.steps_per_epoch": self.plan.steps_per_epoch},
                manifest=None if resumed else self.manifest,
                resumed_at=self.state.global_step if resumed else None)
            self.state.mlflow_run_id = self.logger.run_id
        self.state.mlflow_run_id = self.group.broadcast(self.state.mlflow_run_id)

    # ----------------------------------------------------------------------------- helpers
    def _loader(self, dataset, batches: list[list[int]], epoch: int = 0) -> torch.utils.data.DataLoader:
        # A generator of its own: a DataLoader draws its workers' base seed from the global torch RNG each time
        # it starts, and a run resumed mid-epoch starts one where the uninterrupted run did not, which shifted
        # every later dropout mask by one draw. Loading itself is deterministic, so the seed only has to be fixed.
        seed = int(np.random.SeedSequence([self.cfg.optim.seed, epoch, self.rank]).generate_state(1)[0])
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.collator,
                                           num_workers=self.cfg.data.num_loader_workers,
                                           generator=torch.Generator().manual_seed(seed))

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg, st = self.cfg, self.state
        every = cfg.eval.every_steps
        self.progress.send("start", step=st.global_step, total_steps=self.total_steps,
                           steps_per_epoch=self.plan.steps_per_epoch, epochs=cfg.optim.epochs)
        while not st.done and st.epoch < cfg.optim.epochs:
            steps = self.plan.worker_micro_batches(st.epoch, self.rank, start_step=st.step_in_epoch)
            loader = iter(self._loader(self.splits["train"].features, [mb for step in steps for mb in step], st.epoch))
            for _ in steps:
                t0 = time.perf_counter()
                res = self.optimizer_step([next(loader) for _ in range(self.accum)])
                st.global_step += 1
                st.step_in_epoch += 1
                self.timing["train_s"] += time.perf_counter() - t0
                self._log_step(res)
                self.progress.send("step", step=st.global_step, epoch=st.epoch, loss=float(res.total.detach()),
                                   shown=self.objective.live_values(self.objective.log_values()))
                self.step_hook.after_step(self, st.global_step)
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
        wanted = self.objective.forward_inputs
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
        for batch in micro_batches:
            dev_batch = to_device(batch, self.device)
            if wanted:
                loss, extra = per_sample_loss(self.engine, dev_batch, inputs=wanted, layer=self.objective.hidden_layer)
                for name in wanted:
                    inputs[name].append(extra[name])
            else:
                loss = per_sample_loss(self.engine, dev_batch)
            losses.append(loss)
            stratum.append(dev_batch["stratum"])
            attribute.append(dev_batch["attribute"])
            utt_ids += batch["utt_id"]
        losses_t = self.step_hook.losses(self, self.state.global_step + 1, torch.cat(losses))
        if plain_mean:
            loss = losses_t.mean()
            self.engine.backward(loss)
            self.engine.step()
            return loss
        try:
            res = self.objective(losses_t, torch.cat(stratum), torch.cat(attribute),
                                 inputs={name: torch.cat(parts) for name, parts in inputs.items()})
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
        bad = [u for part in self.group.gather(bad_local) for u in part]
        raise TrainingError(f"non-finite training loss at optimizer step {self.state.global_step + 1} "
                             f"(epoch {self.state.epoch}); utterances with NaN/inf loss: {', '.join(bad)}")

    # ----------------------------------------------------------------------------- evaluate
    def predict(self, split: str) -> pd.DataFrame:
        """Loss, label scores and prediction for every row of `split`, sharded over workers and gathered
        (ermgap.run_data.predict_split): one row per utterance (manifest order) on every rank."""
        return predict_split(self.engine, self.splits[split], self.collator, self.task, self.cfg, rank=self.rank,
                             world=self.world, device=self.device, gather=self.group.gather)

    def split_metrics(self, frame: pd.DataFrame, prefix: str) -> dict[str, float]:
        """Every reported metric of a predictions frame (ermgap.metric_registry; ermgap.run_data.split_metrics),
        and the objective's own metrics of that split (`Objective.eval_metrics`, e.g. an adversary's leakage)."""
        own = objective_metrics(self.engine, self.splits[prefix], prefix, self.collator, self.objective, self.cfg,
                                rank=self.rank, world=self.world, device=self.device, gather=self.group.gather)
        return {**split_metrics(frame, prefix, self.task, self.cfg.data.modality), **own}

    def _cells(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        return cell_indices(frame, self.task, self.cfg.data.modality)

    def update_objective(self, metrics: dict[str, float]) -> None:
        """The objective's own reaction to this evaluation's dev metrics (every rank holds the same gathered
        dev set, so its state stays identical everywhere)."""
        self.objective.on_evaluation(metrics, eval_round=self.state.eval_round)

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
        """Dev evaluation → the objective's update → best/early-stopping bookkeeping → checkpoint + report."""
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
                           shown=self.objective.live_values(self.objective.log_values()),
                           metrics={k: metrics[k] for k in ("dev_w_f1", "dev_worst_lang_gap", "dev_loss_gap")},
                           metric=cfg.eval.metric, best=st.best_score, best_round=st.best_round)
        self.save_checkpoint(metrics)

    # ----------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"ermgap-ckpt-r{self.rank}-"))
        try:
            checkpointing.save(tmp, engine=self.engine, rank=self.rank, zero_stage=self.cfg.distributed.zero_stage,
                               state=self.state, best_adapter=self.best_adapter)
            # Ray copies the checkpoint into the run directory: a full disk there is a user error (NoSpaceError).
            with contextlib.nullcontext() if self.run_dir.is_remote else no_space_reported(self.run_dir.local):
                ray.train.report(json_safe(metrics, nan_to_none=False),
                                 checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
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
            extra = {**self.objective.outputs(), "history": st.history, "timing": self.timing,
                     "feature_cache": cache_stats}
            write_outputs(self.run_dir, self.logger, final, dev, test, extra=extra, step=st.global_step,
                          best_round=st.best_round, adapter=None if self.best_adapter is None
                          else (self.engine.module, self.best_adapter))
        st.objective = self.objective.state_dict()
        # Before the final report: in a sweep, Tune ends the trial when it receives a result with done=True and
        # may stop this worker before the report call returns, leaving the MLflow run RUNNING forever.
        if self.logger is not None:
            self.logger.end("FINISHED")
        self.save_checkpoint(final)
        return final

    def _feature_cache_stats(self) -> dict[str, Any] | None:
        """All ranks' cache hits, misses and encoder seconds, summed (None when the cache is off)."""
        if self.feature_cache is None:
            return None
        return CacheStats.total(self.group.gather(self.feature_cache.stats)).to_dict()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring for the order of the steps). Nothing is freed at the
    end: Ray Train ends this worker's process once the function returns (a garbage collection here added ~0.4 s
    to every run's end)."""
    recipe = LoRARecipe()
    try:
        recipe.setup(loop_config)
        if not recipe.state.done:
            recipe.train()
        recipe.finish()
    except Exception as err:
        # A user error (a full MLflow store is one): recorded for the driver, which ends the run without Ray's
        # retry (ermgap.failures).
        user = err if isinstance(err, ErmgapError) else full_store_error(err, loop_config["mlflow"]["tracking_uri"])
        if user is None:
            raise
        record_error(loop_config["run_dir"], user, ray.train.get_context().get_world_rank())
        if user is err:
            raise
        raise user from err


__all__ = ["LoRARecipe", "StepHook", "train_loop_per_worker"]
