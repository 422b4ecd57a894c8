"""The training recipe: LoRA fine-tuning with ERM-MinMaxGAP on Ray Train workers running DeepSpeed.

Read it top to bottom (torchtune style, no Trainer base class):

    run_training (driver)      validate config and inputs → start/join Ray → build_trainer → fit → final metrics
    train_loop_per_worker      what every Ray Train worker runs:
        LoRARecipe.setup         seed, backbone + LoRA, data plan, DeepSpeed engine, λ, restore checkpoint
        LoRARecipe.train         optimizer steps; evaluate + checkpoint each epoch (or every N steps)
        LoRARecipe.evaluate      whole dev set sharded over workers, gathered, metrics, λ update, early stopping
        LoRARecipe.save_checkpoint   ray.train.report(metrics, checkpoint)
        LoRARecipe.finish        best adapter → dev/test predictions, final report
        LoRARecipe.cleanup

Where the distributed reduction happens: only inside `ermgap.objective.erm_minmaxgap_loss`
(group loss sums/counts all-reduced with autograd) and DeepSpeed's gradient averaging.

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

Data: `ermgap.sampler.GlobalBatchPlan` (seeded per epoch, length-grouped) fixes which utterances
form each optimizer step independently of the worker count; see its docstring for why not Ray Data.

Fault tolerance: every evaluation writes a checkpoint (ermgap.checkpointing: DeepSpeed state
without frozen weights, best LoRA adapter, λ, data position, per-rank RNG, MLflow run id) through
`ray.train.report`. A restarted worker group (FailureConfig) or `ermgap train --resume RUN_DIR`
(same storage_path + name: Ray Train V2 reloads the run's checkpoint manager) loads it and
continues at the same step with the same data order and RNG, so on CPU the result equals an
uninterrupted run. Test hooks: $ERMGAP_FAULT_KILL_AT_STEP (last rank exits once after that step)
and $ERMGAP_FAULT_NAN_AT_STEP (a NaN loss on the last rank), read by `run_training` only.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ermgap.checkpointing import TrainerState
from ermgap.config import RunConfig, config_from_dict, default_tracking_uri, dump_yaml, flatten
from ermgap.errors import ConfigError, ManifestError, TrainingError
from ermgap.io import atomic_write_text
from ermgap.labels import EMOTIONS, GENDERS, LANGUAGES, MODALITIES

# Dev metrics usable for early stopping (`eval.metric`) → the reported key.
EVAL_METRICS = ("w_f1", "acc", "avg_gap", "worst_lang_gap", "loss", "loss_gap")
ERROR_FILE = "error.txt"
METRICS_FILE = "metrics.json"
# Fault injection for tests: kill the last rank after step N / make its first loss NaN at step N.
FAULT_ENV = "ERMGAP_FAULT_KILL_AT_STEP"
NAN_ENV = "ERMGAP_FAULT_NAN_AT_STEP"


# =============================================================================== worker side


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


class _FeatureCache(torch.utils.data.Dataset):
    """UtteranceDataset items with log-mel features computed once per worker and reused every epoch."""

    def __init__(self, base, processor) -> None:
        self.base, self.processor, self.cache = base, processor, {}

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        if i not in self.cache:
            from ermgap.batching import featurize

            self.cache[i] = featurize(self.processor, [self.base[i]])[0]
        return self.cache[i]


def _stratum(batch: dict, cfg: RunConfig) -> tuple[torch.Tensor, int]:
    """Group index within which the gender gap is measured, and the number of groups."""
    lang = batch["language"]
    if cfg.objective.stratum == "language":
        return lang, len(LANGUAGES)
    return lang * len(MODALITIES) + MODALITIES.index(cfg.data.modality), len(LANGUAGES) * len(MODALITIES)


class LoRARecipe:
    """One worker's view of a training run. Methods run in the order they are listed."""

    # ----------------------------------------------------------------------------- setup
    def setup(self, loop_config: dict[str, Any]) -> None:
        t_setup = time.perf_counter()
        import deepspeed
        import ray.train

        from ermgap.batching import EmotionCollator
        from ermgap.data.dataset import UtteranceDataset
        from ermgap.data.manifest import read_manifest
        from ermgap.model import apply_lora, load_backbone
        from ermgap.objective import AdaptiveLambda
        from ermgap.sampler import GlobalBatchPlan

        self.loop_config = loop_config
        self.cfg = cfg = config_from_dict(loop_config["config"], source="loop_config")
        self.run_dir = Path(loop_config["run_dir"])
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = torch.device("cpu")
        if cfg.distributed.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            torch.set_num_threads(max(1, int(cfg.distributed.cpus_per_worker)))
        self.accum = cfg.optim.effective_batch_size // (cfg.optim.micro_batch_size * self.world)

        # Same seed on every rank: identical LoRA init (DeepSpeed also broadcasts rank 0's weights).
        _seed_everything(cfg.optim.seed)
        model, processor = load_backbone(cfg.model, device=self.device)
        model = apply_lora(model, cfg.lora)

        df = read_manifest(cfg.data.manifest)
        if cfg.data.languages:
            df = df[df["language"].isin(cfg.data.languages)]
        self.splits = {}
        for split in ("train", "dev", "test"):
            part = df[df["split"] == split].reset_index(drop=True)
            base = UtteranceDataset(part, sample_rate=cfg.data.sample_rate, max_audio_s=cfg.data.max_audio_s)
            self.splits[split] = (part, base, _FeatureCache(base, processor))
        self.collator = EmotionCollator(processor, cfg.prompt, cfg.data.modality, sample_rate=cfg.data.sample_rate)
        self.plan = GlobalBatchPlan(self.splits["train"][1].lengths, effective_batch=cfg.optim.effective_batch_size,
                                    num_workers=self.world, accum=self.accum, seed=cfg.optim.seed)
        self.total_steps = cfg.optim.epochs * self.plan.steps_per_epoch

        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(self.total_steps, int(cfg.optim.warmup_ratio * self.total_steps),
                                  cfg.optim.scheduler))
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        ds_config = {
            # Accumulation is ours (module docstring): DeepSpeed sees one micro-batch per step.
            "train_micro_batch_size_per_gpu": cfg.optim.micro_batch_size * self.accum,
            "gradient_accumulation_steps": 1,
            "train_batch_size": cfg.optim.effective_batch_size,
            "gradient_clipping": cfg.optim.max_grad_norm,
            "zero_optimization": {"stage": cfg.distributed.zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        t_ds = time.perf_counter()
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # Dropout masks differ across ranks (a checkpoint restores each rank's own RNG state).
        torch.manual_seed(cfg.optim.seed + 1 + self.rank)
        self.lam = AdaptiveLambda(init=cfg.lam.init, eta=cfg.lam.eta, epsilon=cfg.lam.epsilon,
                                  lam_max=cfg.lam.lam_max, mode=cfg.lam.mode)
        self.state = TrainerState()
        self.best_adapter: dict[str, torch.Tensor] | None = None
        self.logger = None
        self.timing = {"setup_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0,
                       "deepspeed_init_s": time.perf_counter() - t_ds}

        checkpoint = self._checkpoint_to_resume()
        if checkpoint is not None:
            from ermgap import checkpointing

            with checkpoint.as_directory() as d:
                self.state, self.best_adapter = checkpointing.load(Path(d), engine=self.engine, rank=self.rank)
            self.lam.load_state_dict(self.state.lam)

        if self.rank == 0:
            from ermgap.tracking import RunLogger

            params = flatten(cfg.to_dict())
            params.update({"derived.grad_accum_steps": self.accum, "derived.world_size": self.world,
                           "derived.steps_per_epoch": self.plan.steps_per_epoch})
            self.logger = RunLogger.open(loop_config["mlflow"], run_dir=self.run_dir,
                                         run_id=self.state.mlflow_run_id, params=params)
            self.state.mlflow_run_id = self.logger.run_id
            if checkpoint is None:
                # run_training writes it; a sweep trial's run_dir may not have it yet.
                cfg_file = self.run_dir / "config.yaml"
                if not cfg_file.is_file():
                    atomic_write_text(cfg_file, dump_yaml(cfg), force=True)
                self.logger.log_artifact(cfg_file)
        # Every rank reports the same run id.
        self.state.mlflow_run_id = self._broadcast(self.state.mlflow_run_id)
        self.timing["setup_s"] = time.perf_counter() - t_setup

    # ----------------------------------------------------------------------------- helpers
    def _checkpoint_to_resume(self):
        """Ray's latest registered checkpoint, or a newer complete one on local storage (see
        checkpointing.newest_on_disk); rank 0 decides so every rank loads the same one."""
        import ray.train

        from ermgap.checkpointing import TrainerState, newest_on_disk

        registered = ray.train.get_checkpoint()
        choice = None
        if self.rank == 0:
            choice = registered.path if registered is not None else None
            exp_dir = Path(ray.train.get_context().get_storage().experiment_fs_path)
            if exp_dir.is_dir():
                newest = newest_on_disk(exp_dir, self.world)
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

    def _loader(self, dataset, batches: list[list[int]]):
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=self.collator,
                                           num_workers=self.cfg.data.num_loader_workers)

    # ----------------------------------------------------------------------------- train
    def train(self) -> None:
        cfg, st = self.cfg, self.state
        fault_step = self.loop_config.get("fault", {}).get("kill_at_step")
        fault_marker = Path(self.loop_config.get("fault", {}).get("marker", self.run_dir / ".fault_fired"))
        while not st.done and st.epoch < cfg.optim.epochs:
            steps = self.plan.worker_micro_batches(st.epoch, self.rank, start_step=st.step_in_epoch)
            loader = iter(self._loader(self.splits["train"][2], [mb for step in steps for mb in step]))
            for _ in steps:
                t0 = time.perf_counter()
                res = self.optimizer_step([next(loader) for _ in range(self.accum)])
                st.global_step += 1
                st.step_in_epoch += 1
                self.timing["train_s"] += time.perf_counter() - t0
                if self.logger is not None:
                    row = {"train/loss": float(res.total.detach()), "train/erm": res.erm,
                           "train/gap": res.gap, "lambda": self.lam.value,
                           "lr": self.scheduler.get_last_lr()[0]}
                    row.update(_stratum_gap_metrics("train/gap_", res.stratum_gaps, cfg))
                    self.logger.log_metrics(row, step=st.global_step)
                if fault_step is not None and st.global_step == fault_step and self.rank == self.world - 1 \
                        and not fault_marker.exists():
                    fault_marker.write_text(f"killed rank {self.rank} after step {st.global_step}\n")
                    os._exit(1)  # fault injection (tests): die without cleanup, like a lost node
                if cfg.eval.every_steps and st.global_step % cfg.eval.every_steps == 0:
                    self.evaluate_and_checkpoint()
                    if st.done:
                        return
            st.epoch += 1
            st.step_in_epoch = 0
            if not cfg.eval.every_steps or (st.epoch == cfg.optim.epochs
                                            and st.global_step % cfg.eval.every_steps):
                self.evaluate_and_checkpoint()
        st.done = True

    def optimizer_step(self, micro_batches: list[dict], *, plain_mean: bool = False):
        """One optimizer step over this worker's micro-batches (the objective sees all of them at once).

        plain_mean=True backpropagates the local mean loss instead of the objective (benchmark baseline).
        """
        from ermgap.batching import to_device
        from ermgap.objective import erm_minmaxgap_loss

        self.engine.train()
        losses, stratum, attribute, utt_ids = [], [], [], []
        for batch in micro_batches:
            dev_batch = to_device(batch, self.device)
            losses.append(_per_sample_loss(self.engine, dev_batch))
            s, num_strata = _stratum(dev_batch, self.cfg)
            stratum.append(s)
            attribute.append(dev_batch["gender"])
            utt_ids += batch["utt_id"]
        losses_t = torch.cat(losses)
        if self.loop_config.get("fault", {}).get("nan_at_step") == self.state.global_step + 1 \
                and self.rank == self.world - 1:
            losses_t = losses_t * torch.where(torch.arange(len(losses_t)) == 0, float("nan"), 1.0)  # tests
        if plain_mean:
            loss = losses_t.mean()
            self.engine.backward(loss)
            self.engine.step()
            return loss
        try:
            res = erm_minmaxgap_loss(losses_t, torch.cat(stratum), torch.cat(attribute), lam=self.lam.value,
                                     p=self.cfg.objective.p, num_strata=num_strata, num_attrs=len(GENDERS))
        except TrainingError:  # raised on every rank alike: the bad-loss count is all-reduced
            self._non_finite(losses_t, utt_ids)
        self.engine.backward(res.total)
        self.engine.step()
        return res

    def _non_finite(self, losses: torch.Tensor, utt_ids: list[str]) -> None:
        """Stop every rank together, naming the step and the utterances whose loss is NaN/inf."""
        bad_local = [u for u, ok in zip(utt_ids, torch.isfinite(losses.detach()).tolist()) if not ok]
        bad = [u for part in self._gather(bad_local) for u in part]
        raise _NonFiniteLoss(f"non-finite training loss at optimizer step {self.state.global_step + 1} "
                             f"(epoch {self.state.epoch}); utterances with NaN/inf loss: {', '.join(bad)}")

    # ----------------------------------------------------------------------------- evaluate
    @torch.no_grad()
    def predict(self, split: str) -> pd.DataFrame:
        """Loss, label scores and prediction for every row of `split`, sharded over workers and gathered.

        Returns one row per utterance (manifest order) on every rank.
        """
        from ermgap.batching import to_device
        from ermgap.model import score_labels
        from ermgap.sampler import shard_for_eval
        from ermgap.scoring import answer_loss_from_scores

        part, base, cached = self.splits[split]
        self.engine.eval()
        rows = []
        for chunk in shard_for_eval(base.lengths, rank=self.rank, num_workers=self.world,
                                    batch_size=self.cfg.eval.batch_size):
            idx = [i for i, _ in chunk]
            batch = to_device(self.collator([cached[i] for i in idx]), self.device)
            scores = score_labels(self.engine, batch).float()
            loss = answer_loss_from_scores(scores, batch).cpu()
            scores = scores.cpu()
            for j, (i, keep) in enumerate(chunk):
                if keep:
                    rows.append((i, float(loss[j]), scores[j].tolist()))
        from ermgap.evaluate import predictions_frame

        gathered = sorted((r for part_rows in self._gather(rows) for r in part_rows), key=lambda r: r[0])
        scores = np.array([r[2] for r in gathered], dtype=np.float64).reshape(len(gathered), len(EMOTIONS))
        frame = predictions_frame(part["utt_id"], part["language"], part["gender"], part["emotion"],
                                  scores.argmax(1) if len(gathered) else [], scores=scores,
                                  modality=self.cfg.data.modality)
        frame["loss"] = [r[1] for r in gathered]  # per-sample dev loss (for Δdev), not written to PREDS.csv
        return frame

    def _split_metrics(self, frame: pd.DataFrame, prefix: str) -> dict[str, float]:
        from ermgap.metrics import compute_metrics
        from ermgap.objective import dev_gap

        m = compute_metrics(_preds_only(frame))
        lang = torch.tensor([LANGUAGES.index(x) for x in frame["language"]])
        stratum = lang if self.cfg.objective.stratum == "language" else \
            lang * len(MODALITIES) + MODALITIES.index(self.cfg.data.modality)
        num_strata = len(LANGUAGES) * (1 if self.cfg.objective.stratum == "language" else len(MODALITIES))
        gender = torch.tensor([GENDERS.index(x) for x in frame["gender"]])
        loss_gap, stratum_gaps = dev_gap(torch.tensor(frame["loss"].to_numpy()), stratum, gender,
                                         num_strata=num_strata, num_attrs=len(GENDERS))
        lang_gaps = {lg: v["avg_gap"] for lg, v in m["per_language"].items()}
        finite = [v for v in lang_gaps.values() if v == v]
        out = {
            f"{prefix}_w_f1": m["overall"]["w_f1"], f"{prefix}_acc": m["overall"]["acc"],
            f"{prefix}_avg_gap": m["overall"]["avg_gap"],
            f"{prefix}_worst_lang_gap": max(finite) if finite else float("nan"),
            f"{prefix}_loss": float(frame["loss"].mean()), f"{prefix}_loss_gap": float(loss_gap),
        }
        for lg, v in lang_gaps.items():
            out[f"{prefix}_avg_gap_{lg}"] = v
            out[f"{prefix}_w_f1_{lg}"] = m["per_language"][lg]["w_f1"]
        out.update(_stratum_gap_metrics(f"{prefix}_loss_gap_", stratum_gaps, self.cfg))
        return out

    def evaluate_and_checkpoint(self) -> None:
        """Dev evaluation → λ update → early-stopping bookkeeping → checkpoint + report."""
        cfg, st = self.cfg, self.state
        t0 = time.perf_counter()
        metrics = self._split_metrics(self.predict("dev"), "dev")
        self.timing["eval_s"] += time.perf_counter() - t0
        st.eval_round += 1
        lam_used = self.lam.value
        # Every rank holds the same gathered dev set, so the λ update is identical everywhere.
        drive = metrics["dev_loss_gap"] if cfg.lam.dev_gap == "loss_gap" else metrics["dev_avg_gap"] / 100.0
        self.lam.update(drive if drive == drive else 0.0)
        score = metrics[f"dev_{cfg.eval.metric}"]
        better = score == score and (st.best_score is None or
                                     (score > st.best_score if cfg.eval.metric_mode == "max" else score < st.best_score))
        if better:
            from ermgap.checkpointing import adapter_state

            st.best_score, st.best_round, st.bad_rounds = float(score), st.eval_round, 0
            self.best_adapter = adapter_state(self.engine.module, cfg.distributed.zero_stage)
        else:
            st.bad_rounds += 1
        if cfg.eval.patience and st.bad_rounds >= cfg.eval.patience:
            st.done = True
        if st.epoch >= cfg.optim.epochs:
            st.done = True
        metrics.update({
            "eval_round": st.eval_round, "epoch": st.epoch + st.step_in_epoch / max(1, self.plan.steps_per_epoch),
            "step": st.global_step, "lambda": self.lam.value, "lambda_used": lam_used,
            f"best_dev_{cfg.eval.metric}": st.best_score if st.best_score is not None else float("nan"),
            "best_eval_round": st.best_round, "mlflow_run_id": st.mlflow_run_id, "done": False,
            "stopped_early": bool(st.done and st.epoch < cfg.optim.epochs),
        })
        st.lam = self.lam.state_dict()
        st.history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float, bool))})
        if self.logger is not None:
            self.logger.log_metrics({k: v for k, v in metrics.items() if k not in ("eval_round", "step")},
                                    step=st.global_step)
        self.save_checkpoint(metrics)

    # ----------------------------------------------------------------------------- checkpoint
    def save_checkpoint(self, metrics: dict[str, Any]) -> None:
        import ray.train

        from ermgap import checkpointing

        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"ermgap-ckpt-r{self.rank}-"))
        checkpointing.save(tmp, engine=self.engine, rank=self.rank, zero_stage=self.cfg.distributed.zero_stage,
                           state=self.state, best_adapter=self.best_adapter)
        ray.train.report(_plain(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        shutil.rmtree(tmp, ignore_errors=True)
        self.timing["checkpoint_s"] += time.perf_counter() - t0

    # ----------------------------------------------------------------------------- finish
    def finish(self) -> dict[str, Any]:
        """Best adapter → dev and test predictions → CSVs, MLflow, final report (done=True)."""
        from ermgap.checkpointing import apply_adapter_state
        from ermgap.io import atomic_path

        cfg, st = self.cfg, self.state
        if self.best_adapter is not None:
            apply_adapter_state(self.engine.module, self.best_adapter, cfg.distributed.zero_stage)
        t0 = time.perf_counter()
        dev, test = self.predict("dev"), self.predict("test")
        self.timing["eval_s"] += time.perf_counter() - t0
        final = self._split_metrics(dev, "dev")
        if len(test):
            final.update(self._split_metrics(test, "test"))
        final.update({
            "eval_round": st.eval_round, "epoch": float(st.epoch), "step": st.global_step,
            "lambda": self.lam.value, f"best_dev_{cfg.eval.metric}": st.best_score,
            "best_dev_w_f1": final["dev_w_f1"], "best_eval_round": st.best_round,
            "mlflow_run_id": st.mlflow_run_id, "done": True,
            "stopped_early": st.epoch < cfg.optim.epochs,
        })
        if self.rank == 0:
            import json

            for name, frame in (("dev_preds.csv", dev), ("test_preds.csv", test)):
                with atomic_path(self.run_dir / name, force=True) as tmp:
                    _preds_only(frame).to_csv(tmp, index=False)
            with atomic_path(self.run_dir / METRICS_FILE, force=True) as tmp:
                tmp.write_text(json.dumps({**_plain(final), "lambda_history": self.lam.history,
                                           "history": st.history, "timing": self.timing}, indent=1))
            from ermgap.checkpointing import save_adapter

            if self.best_adapter is not None:
                save_adapter(self.engine.module, self.best_adapter, self.run_dir / "adapter")
            lg = self.logger
            lg.log_metrics({f"final/{k}": v for k, v in final.items()}, step=st.global_step)
            lg.log_artifact(self.run_dir / "dev_preds.csv", "predictions")
            lg.log_artifact(self.run_dir / "test_preds.csv", "predictions")
            lg.log_artifact(self.run_dir / METRICS_FILE)
            if (self.run_dir / "adapter").is_dir():
                lg.log_artifact(self.run_dir / "adapter", "adapter")
            lg.set_tags({"ermgap.stopped_early": final["stopped_early"], "ermgap.best_eval_round": st.best_round})
        st.lam = self.lam.state_dict()
        self.save_checkpoint(final)
        if self.logger is not None:
            self.logger.end("FINISHED")
        return final

    def fail(self, message: str) -> None:
        """A run that cannot continue: the driver raises TrainingError with this message."""
        if self.rank == 0:
            (self.run_dir / ERROR_FILE).write_text(message + "\n")
            if self.logger is not None:
                self.logger.set_tags({"ermgap.error": message[:5000]})
                self.logger.end("FAILED")

    def cleanup(self) -> None:
        import gc

        del self.engine
        gc.collect()


class _NonFiniteLoss(Exception):
    pass


def _per_sample_loss(model, batch: dict) -> torch.Tensor:
    from ermgap.model import per_sample_loss

    return per_sample_loss(model, batch)


def _preds_only(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["loss"])


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON/Ray-safe scalars (no numpy or torch types)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, str)) or v is None:
            out[k] = v
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        else:
            out[k] = float(v)
    return out


def _stratum_gap_metrics(prefix: str, stratum_gaps, cfg: RunConfig) -> dict[str, float]:
    gaps = torch.as_tensor(stratum_gaps).detach().flatten().tolist()
    if cfg.objective.stratum == "language":
        names = list(LANGUAGES)
    else:
        names = [f"{lg}_{m}" for lg in LANGUAGES for m in MODALITIES]
    return {f"{prefix}{n}": g for n, g in zip(names, gaps) if g == g}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring for the order of the steps)."""
    recipe = LoRARecipe()
    recipe.setup(loop_config)
    try:
        if not recipe.state.done:
            recipe.train()
        recipe.finish()
    except _NonFiniteLoss as err:
        recipe.fail(str(err))
    finally:
        recipe.cleanup()


# =============================================================================== driver side


def build_trainer(cfg: RunConfig, *, run_dir: str | os.PathLike, name: str, storage_path: str | os.PathLike,
                  callbacks=(), mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None,
                  resume: bool = False, fault: dict | None = None):
    """A TorchTrainer for one run. Re-running it with the same storage_path + name resumes from the
    latest checkpoint (Ray Train V2 restores the run's checkpoint manager from storage)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = Path(run_dir)
    cfg = _absolute_paths(cfg)
    loop_config = {
        "config": cfg.to_dict(),
        "run_dir": str(run_dir.resolve()),
        "mlflow": {"tracking_uri": default_tracking_uri(cfg), "experiment": cfg.tracking.experiment,
                   "run_name": cfg.tracking.run_name or name, "parent_run_id": mlflow_parent_run_id,
                   "tags": dict(mlflow_tags or {})},
        "fault": {**(fault or {}), "marker": str(run_dir.resolve() / ".fault_fired")},
        "resume": resume,
    }
    d = cfg.distributed
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu,
                                     resources_per_worker={"CPU": d.cpus_per_worker}),
        run_config=RayRunConfig(
            name=name, storage_path=str(Path(storage_path).resolve()) if "://" not in str(storage_path)
            else str(storage_path),
            failure_config=FailureConfig(max_failures=d.max_failures),
            # The latest checkpoint is what resumes; the best adapter travels inside every checkpoint.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks)),
    )


def _absolute_paths(cfg: RunConfig) -> RunConfig:
    """Workers may start in another directory: make local paths absolute before shipping the config."""
    tree = cfg.to_dict()
    tree["data"]["manifest"] = str(Path(tree["data"]["manifest"]).resolve())
    local = Path(tree["model"]["name_or_path"]).expanduser()
    if local.exists():
        tree["model"]["name_or_path"] = str(local.resolve())
    if not tree["tracking"]["tracking_uri"]:
        tree["tracking"]["tracking_uri"] = default_tracking_uri(cfg)
    if "://" not in tree["tracking"]["storage_path"]:
        tree["tracking"]["storage_path"] = str(Path(tree["tracking"]["storage_path"]).resolve())
    return config_from_dict(tree, source="resolved config")


def check_inputs(cfg: RunConfig) -> None:
    """Everything that can be checked before a Ray worker starts (errors name the key and value)."""
    from ermgap.data.manifest import read_manifest

    manifest = Path(cfg.data.manifest)
    if not manifest.is_file():
        raise ConfigError(f"data.manifest: {manifest} does not exist (generate one with `ermgap data synth`)")
    model = cfg.model.name_or_path
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1
    if looks_local and not (Path(model).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.name_or_path: {model} is not a saved model directory (no config.json); "
                          "build the tiny one with `ermgap model tiny --out models/tiny`")
    if cfg.objective.kind != "minmaxgap":  # until the recipe talks to ermgap.objectives (issue 15, phase 2)
        raise ConfigError(f"objective.kind: {cfg.objective.kind!r} is not wired into the training recipe yet; "
                          "only 'minmaxgap' trains (ERM: lambda.mode=fixed lambda.init=0)")
    if cfg.eval.metric not in EVAL_METRICS:
        raise ConfigError(f"eval.metric: {cfg.eval.metric!r} is not a dev metric; allowed: {', '.join(EVAL_METRICS)}")
    if cfg.distributed.use_gpu and not torch.cuda.is_available() and not _ray_has_gpus():
        raise ConfigError("distributed.use_gpu is true but no GPU is visible (set distributed.use_gpu=false)")
    df = read_manifest(manifest)
    if cfg.data.languages:
        unknown = sorted(set(cfg.data.languages) - set(LANGUAGES))
        if unknown:
            raise ConfigError(f"data.languages: unknown {unknown}; allowed: {list(LANGUAGES)}")
        df = df[df["language"].isin(cfg.data.languages)]
    n_train, n_dev = int((df["split"] == "train").sum()), int((df["split"] == "dev").sum())
    if n_train < cfg.optim.effective_batch_size:
        raise ConfigError(f"optim.effective_batch_size ({cfg.optim.effective_batch_size}) is larger than the train "
                          f"split of {manifest} ({n_train} utterances): not one optimizer step per epoch")
    if n_dev == 0:
        raise ManifestError(f"{manifest}: no dev rows; dev evaluation drives λ and early stopping")


def _ray_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _step_from_env(name: str) -> int | None:
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"${name} must be an integer step, got {raw!r}") from None


def run_training(cfg: RunConfig, *, address: str | None = None, resume_dir: str | os.PathLike | None = None,
                 run_dir: str | os.PathLike | None = None, force: bool = False, num_cpus: int | None = None,
                 mlflow_parent_run_id: str | None = None, mlflow_tags: dict | None = None) -> dict[str, Any]:
    """Train one model and return its final metrics (the `done=True` report; also in RUN_DIR/metrics.json).

    resume_dir: continue the run in that directory (its config.yaml is used, `cfg` is ignored).
    run_dir: where the run lives (default: <tracking.storage_path>/<timestamp>-<run_name or 'train'>).
    """
    import json

    from ermgap.config import load_config
    from ermgap.ray_runtime import ensure_ray
    from ermgap.tracking import mark_run

    if resume_dir is not None:
        run_path = Path(resume_dir).resolve()
        if not (run_path / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume_dir}: not a run directory (no config.yaml)")
        cfg = load_config(run_path / "config.yaml")
        if (run_path / METRICS_FILE).is_file():  # finished already: nothing to resume
            final = json.loads((run_path / METRICS_FILE).read_text())
            return {**final, "run_dir": str(run_path), "tracking_uri": default_tracking_uri(cfg)}
    else:
        cfg = _absolute_paths(cfg)
        if run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(cfg.tracking.storage_path) / f"{stamp}-{cfg.tracking.run_name or 'train'}"
        run_path = Path(run_dir).resolve()
        if run_path.exists() and any(run_path.iterdir()):
            if not force:
                raise ConfigError(f"run directory {run_path} already exists; pass --force to replace it "
                                  f"or --resume {run_path} to continue it")
            shutil.rmtree(run_path)
    check_inputs(cfg)
    fault = {"kill_at_step": _step_from_env(FAULT_ENV), "nan_at_step": _step_from_env(NAN_ENV)}
    run_path.mkdir(parents=True, exist_ok=True)
    if resume_dir is None:
        atomic_write_text(run_path / "config.yaml", dump_yaml(cfg), force=True)
    (run_path / ERROR_FILE).unlink(missing_ok=True)

    ensure_ray(address, num_cpus=num_cpus)
    trainer = build_trainer(cfg, run_dir=run_path, name=run_path.name, storage_path=run_path.parent,
                            mlflow_parent_run_id=mlflow_parent_run_id, mlflow_tags=mlflow_tags,
                            resume=resume_dir is not None, fault=fault)
    uri = default_tracking_uri(cfg)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        mark_run(uri, run_path, "KILLED")
        raise
    except Exception as err:
        mark_run(uri, run_path, "FAILED")
        raise TrainingError(f"training failed ({type(err).__name__}); run directory {run_path}; "
                            f"continue with `ermgap train --resume {run_path}`:\n{err}") from err
    if (run_path / ERROR_FILE).is_file():
        raise TrainingError((run_path / ERROR_FILE).read_text().strip() + f" (run directory {run_path})")
    metrics_file = run_path / METRICS_FILE
    if not metrics_file.is_file():
        raise TrainingError(f"training ended without final metrics ({metrics_file} missing)")
    final = json.loads(metrics_file.read_text())
    final["run_dir"] = str(run_path)
    final["tracking_uri"] = uri
    return final


__all__ = ["LoRARecipe", "build_trainer", "check_inputs", "run_training", "train_loop_per_worker"]
