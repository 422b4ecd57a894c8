"""What a training checkpoint holds and how each worker writes and reads its part.

Layout of one checkpoint directory (Ray Train merges every worker's files into it):

    deepspeed/            engine.save_checkpoint: trainable weights, optimizer (ZeRO partitions: one
                          file per rank) and LR-scheduler state, tag "state"
    best_adapter/         the best-so-far LoRA adapter in plain peft format (rank 0)
    trainer_state.json    epoch, step, eval round, objective state (λ, q), best-metric tracker, MLflow run id (rank 0)
    rng/rank<R>.pt        this rank's torch / numpy / python RNG states (tensors and ints only,
                          so it loads with torch.load(weights_only=True))
    complete/rank<R>.json every file this rank wrote with its size; written last, atomically

Each rank writes into its own local temporary directory and Ray Train uploads it to storage, in an
order it does not promise, so the completeness markers list what must be there rather than relying on
arriving last: a checkpoint cut off by a full disk or a crash (missing or short files) fails
`incomplete_reason` and is skipped with a warning when a run resumes.

Frozen backbone weights are never written (`exclude_frozen_parameters`): a 7B checkpoint is the
LoRA weights plus their Adam moments, not 15 GB.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ermgap.errors import ErmgapWarning
from ermgap.io import atomic_write_text, no_space_reported

DS_TAG = "state"
COMPLETE_DIR = "complete"


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs to continue exactly where it stopped."""

    epoch: int = 0                 # epoch in progress (0-based)
    step_in_epoch: int = 0         # optimizer steps already done in `epoch`
    global_step: int = 0           # optimizer steps done in total
    eval_round: int = 0            # evaluations done
    best_score: float | None = None
    best_round: int = 0
    bad_rounds: int = 0            # evaluations since the last improvement (early-stopping counter)
    done: bool = False             # training finished (early stop or max epochs); only final predictions remain
    mlflow_run_id: str | None = None
    objective: dict[str, Any] = field(default_factory=dict)  # Objective.state_dict(): λ or q and its trajectory
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per evaluation
    batch_coverage: dict[str, Any] = field(default_factory=dict)  # sampler.BatchCoverage of the steps done

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_tuples(state["python"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    """weights_only loading returns lists for some tuples; random.setstate needs tuples."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter], zero_stage: int):
    """Full parameter values inside the block (ZeRO-3 partitions them; other stages already hold them)."""
    if zero_stage == 3:
        import deepspeed  # only ZeRO-3 needs it; importing DeepSpeed costs seconds and logs accelerator detection

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


# The attribute name of an objective's own module on the model (ermgap.recipe attaches it).
OBJECTIVE_MODULE = "objective_module"


def adapter_state(peft_model, zero_stage: int) -> dict[str, torch.Tensor]:
    """A CPU copy of the LoRA weights in peft's saved-adapter key format."""

    from peft import get_peft_model_state_dict  # here: the driver reaches this module and never needs peft

    params = [p for p in peft_model.parameters() if p.requires_grad]
    with gathered(params, zero_stage):
        sd = dict(get_peft_model_state_dict(peft_model))
        # An objective's own trainable module (an adversary's head) belongs to the same best state.
        own = getattr(peft_model, OBJECTIVE_MODULE, None)
        if own is not None:
            sd.update({f"{OBJECTIVE_MODULE}.{k}": v for k, v in own.state_dict().items()})
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def save_adapter(peft_model, state: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write `state` (from adapter_state) as a plain peft adapter directory."""

    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.peft_config["default"].save_pretrained(str(out_dir))
    adapter, own = _split_objective_module(state)
    save_file(adapter, str(out_dir / "adapter_model.safetensors"))
    if own:  # beside the adapter, not in it: inference (peft's loader) never needs it
        save_file(own, str(out_dir / f"{OBJECTIVE_MODULE}.safetensors"))


def _split_objective_module(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    prefix = f"{OBJECTIVE_MODULE}."
    return ({k: v for k, v in state.items() if not k.startswith(prefix)},
            {k: v for k, v in state.items() if k.startswith(prefix)})


def load_adapter_state(adapter_dir: Path) -> dict[str, torch.Tensor]:

    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    own = adapter_dir / f"{OBJECTIVE_MODULE}.safetensors"
    return {**state, **load_file(str(own))} if own.is_file() else state


def apply_adapter_state(peft_model, state: dict[str, torch.Tensor], zero_stage: int) -> None:
    """Overwrite the model's LoRA weights with `state` (same format as adapter_state)."""
    from peft import set_peft_model_state_dict

    params = [p for p in peft_model.parameters() if p.requires_grad]
    state, own = _split_objective_module(state)

    def load_own() -> None:
        if own:
            getattr(peft_model, OBJECTIVE_MODULE).load_state_dict(
                {k.removeprefix(f"{OBJECTIVE_MODULE}."): v for k, v in own.items()})

    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            set_peft_model_state_dict(peft_model, state)
            load_own()
    else:
        with torch.no_grad():
            result = set_peft_model_state_dict(peft_model, state)
            load_own()
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise RuntimeError(f"adapter state does not fit the model: unexpected keys {missing[:5]}")


def save(out_dir: Path, *, engine, rank: int, zero_stage: int, state: TrainerState,
         best_adapter: dict[str, torch.Tensor] | None) -> None:
    """Write this rank's part of a checkpoint into out_dir (a per-rank local temp dir), marker last.

    NoSpaceError ("no space left on <out_dir>") when the disk fills up on the way.
    """
    with no_space_reported(out_dir):
        engine.save_checkpoint(str(out_dir / "deepspeed"), tag=DS_TAG, exclude_frozen_parameters=True)
        (out_dir / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), out_dir / "rng" / f"rank{rank}.pt")
        if rank == 0:
            if best_adapter is not None:
                save_adapter(engine.module, best_adapter, out_dir / "best_adapter")
            (out_dir / "trainer_state.json").write_text(state.to_json())
        mark_complete(out_dir, rank)


def mark_complete(out_dir: Path, rank: int) -> None:
    """Write complete/rank<R>.json listing every file under out_dir (this rank's part) with its size."""
    files = {p.relative_to(out_dir).as_posix(): p.stat().st_size for p in sorted(out_dir.rglob("*"))
             if p.is_file() and p.relative_to(out_dir).parts[0] != COMPLETE_DIR}
    atomic_write_text(out_dir / COMPLETE_DIR / f"rank{rank}.json", json.dumps({"rank": rank, "files": files}),
                      force=True)


def load(ckpt_dir: Path, *, engine, rank: int) -> tuple[TrainerState, dict[str, torch.Tensor] | None]:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; return the trainer state."""
    engine.load_checkpoint(str(ckpt_dir / "deepspeed"), tag=DS_TAG, load_module_strict=False,
                           load_optimizer_states=True, load_lr_scheduler_states=True)
    state = TrainerState.from_json((ckpt_dir / "trainer_state.json").read_text())
    rng_file = ckpt_dir / "rng" / f"rank{rank}.pt"
    if rng_file.is_file():  # absent when the world size changed: keep the fresh seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    best_dir = ckpt_dir / "best_adapter"
    best = load_adapter_state(best_dir) if best_dir.is_dir() else None
    return state, best


def incomplete_reason(ckpt_dir: Path, world: int) -> str | None:
    """Why `ckpt_dir` cannot be resumed from (None: complete).

    Complete means: a marker for each of ranks 0..world-1 (and any other rank that wrote one), every
    file a marker lists present with the listed size, and rank 0's trainer state among them.
    """
    ckpt_dir = Path(ckpt_dir)
    markers = {int(p.stem.removeprefix("rank")): p for p in (ckpt_dir / COMPLETE_DIR).glob("rank*.json")
               if p.stem.removeprefix("rank").isdigit()}
    for r in range(world):
        if r not in markers:
            return f"no completeness marker for rank {r} ({COMPLETE_DIR}/rank{r}.json)"
    listed: set[str] = set()
    for r, marker in sorted(markers.items()):
        try:
            files = json.loads(marker.read_text())["files"]
            sizes = {str(k): int(v) for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{COMPLETE_DIR}/{marker.name} is unreadable"
        for rel, size in sizes.items():
            f = ckpt_dir / rel
            if not f.is_file():
                return f"{rel} (rank {r}) is missing"
            if f.stat().st_size != size:
                return f"{rel} (rank {r}) has {f.stat().st_size} bytes, expected {size}"
        listed.update(sizes)
    if "trainer_state.json" not in listed:
        return "rank 0's trainer_state.json is not listed"
    return None


def newest_on_disk(experiment_dir: Path, world: int) -> tuple[Path, int] | None:
    """The complete checkpoint with the most optimizer steps under a local run directory.

    Why not only `ray.train.get_checkpoint()`: Ray Train's controller registers a reported checkpoint
    when it next polls the workers (every 2 s). A worker that dies within that window leaves a
    complete checkpoint on storage that Ray does not know about, and the restart would lose one
    more evaluation interval than necessary.
    """
    best: tuple[Path, int] | None = None
    for d in sorted(p for p in experiment_dir.glob("checkpoint_*") if p.is_dir()):  # not Ray's snapshot .json
        reason = incomplete_reason(d, world)
        if reason is None:
            try:
                step = TrainerState.from_json((d / "trainer_state.json").read_text()).global_step
            except (ValueError, TypeError) as err:
                reason = f"trainer_state.json is unreadable ({err})"
        if reason is not None:
            warnings.warn(f"skipping checkpoint {d}: incomplete, {reason} (cut off by a full disk or a crash)",
                          ErmgapWarning, stacklevel=2)
            continue
        if best is None or step > best[1]:
            best = (d, step)
    return best
