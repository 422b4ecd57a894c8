"""Checkpoints that survive a full disk: a cut-off checkpoint is never resumed from, and the error says why.

The slow test fills a real 2 MB tmpfs (mounted by the test; skipped with the reason when mounting is not
allowed) with real DeepSpeed checkpoints written by `checkpointing.save`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from ermgap.checkpointing import TrainerState, incomplete_reason, mark_complete, newest_on_disk
from ermgap.errors import ErmgapWarning, NoSpaceError
from ermgap.io import atomic_write_bytes, atomic_write_text


def _rank_part(root: Path, rank: int, step: int) -> Path:
    """One rank's files laid out as `checkpointing.save` writes them (no engine needed)."""
    part = root / f"part{rank}"
    (part / "deepspeed" / "state").mkdir(parents=True)
    (part / "deepspeed" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 4000)
    (part / "rng").mkdir()
    (part / "rng" / f"rank{rank}.pt").write_bytes(b"r" * 300)
    if rank == 0:
        (part / "deepspeed" / "latest").write_text("state")
        (part / "deepspeed" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 2000)
        (part / "trainer_state.json").write_text(TrainerState(global_step=step).to_json())
    mark_complete(part, rank)
    return part


def _checkpoint(exp: Path, name: str, step: int, world: int = 2) -> Path:
    """Every rank's part merged into one directory, as Ray Train does on upload."""
    d = exp / name
    for r in range(world):
        shutil.copytree(_rank_part(exp / f".{name}-parts", r, step), d, dirs_exist_ok=True)
    return d


def test_cut_off_checkpoints_are_skipped_with_a_warning(tmp_path):
    exp = tmp_path / "exp"
    _checkpoint(exp, "checkpoint_000001", step=3)
    newer = _checkpoint(exp, "checkpoint_000002", step=6)
    assert incomplete_reason(newer, 2) is None
    # Ray Train's own bookkeeping file beside the checkpoints is no checkpoint (warning about it on every
    # --resume was a false alarm).
    (exp / "checkpoint_manager_snapshot.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert newest_on_disk(exp, 2) == (newer, 6)
    # What a full disk left: the trainer state created but never written (the JSONDecodeError on resume).
    (newer / "trainer_state.json").write_bytes(b"")
    assert incomplete_reason(newer, 2) == "trainer_state.json (rank 0) has 0 bytes, expected " + str(
        len(TrainerState(global_step=6).to_json()))
    with pytest.warns(ErmgapWarning, match=r"skipping checkpoint .*checkpoint_000002: incomplete, trainer_state"):
        assert newest_on_disk(exp, 2) == (exp / "checkpoint_000001", 3)
    # A rank whose upload never arrived, a short optimizer partition, a torn marker.
    third = _checkpoint(exp, "checkpoint_000003", step=9)
    shutil.rmtree(third / "complete")
    (third / "complete").mkdir()
    shutil.copy(exp / "checkpoint_000001" / "complete" / "rank0.json", third / "complete" / "rank0.json")
    assert incomplete_reason(third, 2) == "no completeness marker for rank 1 (complete/rank1.json)"
    fourth = _checkpoint(exp, "checkpoint_000004", step=12)
    part = fourth / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[:1000])
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt (rank 1) has 1000 bytes, expected 4000" in \
        incomplete_reason(fourth, 2)
    fifth = _checkpoint(exp, "checkpoint_000005", step=15)
    (fifth / "complete" / "rank1.json").write_text('{"files": ')
    assert incomplete_reason(fifth, 2) == "complete/rank1.json is unreadable"
    with pytest.warns(ErmgapWarning) as seen:
        assert newest_on_disk(exp, 2) == (exp / "checkpoint_000001", 3)
    assert len(seen) == 4


def test_injected_enospc_is_reported_with_the_path(tmp_path):
    class Full:
        """A file-like object whose write fails the way a full filesystem makes it fail."""

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "out" / "preds.csv"
    with pytest.raises(NoSpaceError, match=rf"no space left on {target} \(writing it failed: .*No space left"):
        from ermgap.io import atomic_path

        with atomic_path(target) as tmp:
            tmp.write_text("header\n")
            Full().write(b"row")
    assert not target.exists() and list(target.parent.iterdir()) == []  # the temporary file is gone too
    atomic_write_text(target, "ok\n")
    assert target.read_text() == "ok\n"
    with pytest.raises(ValueError):  # other errors pass through unchanged
        with atomic_path(tmp_path / "x", force=True):
            raise ValueError("not a disk problem")


SAVE_ON_FULL_DISK = textwrap.dedent("""
    import json, os, sys, warnings
    from pathlib import Path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import torch, deepspeed
    from ermgap import checkpointing
    from ermgap.errors import NoSpaceError

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)  # a ZeRO-2 checkpoint of it is ~1.1 MB: one fits in 2 MB, two do not
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                                              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    engine.backward(engine(torch.ones(1, 256)).sum()); engine.step()
    exp = Path(sys.argv[1]) / "exp"
    out = {}
    checkpointing.save(exp / "checkpoint_000001", engine=engine, rank=0, zero_stage=2,
                       state=checkpointing.TrainerState(global_step=1), best_adapter=None)
    saved = model.weight.detach().clone()
    engine.backward(engine(torch.ones(1, 256)).sum()); engine.step()
    try:
        checkpointing.save(exp / "checkpoint_000002", engine=engine, rank=0, zero_stage=2,
                           state=checkpointing.TrainerState(global_step=2), best_adapter=None)
        out["error"] = None
    except NoSpaceError as err:
        out["error"] = str(err)
    out["reason"] = checkpointing.incomplete_reason(exp / "checkpoint_000002", 1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        newest = checkpointing.newest_on_disk(exp, 1)
    out["newest"] = [str(newest[0]), newest[1]]
    out["warnings"] = [str(w.message) for w in seen]
    state, _ = checkpointing.load(newest[0], engine=engine, rank=0)  # the run resumes from the complete one
    out["resumed_step"] = state.global_step
    out["weights_restored"] = bool(torch.equal(model.weight.detach(), saved))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_deepspeed_checkpoint_on_a_full_disk(small_disk):
    from _procs import free_port

    disk = small_disk
    proc = subprocess.run([sys.executable, "-c", SAVE_ON_FULL_DISK, str(disk), str(free_port())],
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1].removeprefix("RESULT "))
    second = disk / "exp" / "checkpoint_000002"
    assert out["error"] is not None and out["error"].startswith(f"no space left on {second} ")
    assert out["reason"] is not None  # the cut-off checkpoint is not resumable ...
    assert out["newest"] == [str(disk / "exp" / "checkpoint_000001"), 1]  # ... the previous one is
    assert len(out["warnings"]) == 1 and "skipping checkpoint" in out["warnings"][0] and str(second) in \
        out["warnings"][0]
    assert out["resumed_step"] == 1 and out["weights_restored"]


def test_atomic_bytes_and_marker_round_trip(tmp_path):
    part = tmp_path / "part"
    atomic_write_bytes(part / "deepspeed" / "latest", b"state")
    atomic_write_text(part / "trainer_state.json", TrainerState(global_step=4).to_json())
    atomic_write_bytes(part / "rng" / "rank0.pt", b"x" * 10)
    mark_complete(part, 0)
    listed = json.loads((part / "complete" / "rank0.json").read_text())["files"]
    assert listed == {"deepspeed/latest": 5, "rng/rank0.pt": 10,
                      "trainer_state.json": len(TrainerState(global_step=4).to_json())}
    assert incomplete_reason(part, 1) is None


ROUND_TRIP = textwrap.dedent("""
    import json, os, random, sys
    from pathlib import Path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import numpy as np, torch, deepspeed, transformers
    from ermgap import checkpointing

    deepspeed.init_distributed(dist_backend="gloo")
    x, y = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 4

    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Dropout(0.3), torch.nn.Linear(32, 4))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sched = transformers.get_scheduler("linear", opt, num_warmup_steps=2, num_training_steps=20)
        engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
            "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5, "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
        return engine, sched

    def step(engine):  # dropout draws from the global torch RNG; numpy and python draws stand for the sampler's
        engine.train()
        loss = torch.nn.functional.cross_entropy(engine(x), y) + 0 * float(np.random.rand()) + 0 * random.random()
        engine.backward(loss)
        engine.step()
        return loss.item()

    def tensors(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            return {prefix: obj.detach().clone()}
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        return {k: v for key, value in items for k, v in tensors(value, f"{prefix}/{key}").items()}

    def state(engine, sched):
        return {"params": tensors(list(engine.module.parameters())), "optim": tensors(engine.optimizer.state_dict()),
                "rng": checkpointing.rng_state(), "sched": sched.state_dict(), "global_steps": engine.global_steps,
                "lr": [g["lr"] for g in engine.optimizer.param_groups]}

    engine, sched = build(1)
    for _ in range(3):
        step(engine)
    out = Path(sys.argv[1]) / "ckpt"
    checkpointing.save(out, engine=engine, rank=0, zero_stage=2, state=checkpointing.TrainerState(global_step=3),
                       best_adapter=None)
    saved = state(engine, sched)
    ahead = [step(engine) for _ in range(2)]

    fresh, fresh_sched = build(2)  # other weights, and other RNG states, until the load
    step(fresh)
    checkpointing.load(out, engine=fresh, rank=0)
    loaded = state(fresh, fresh_sched)
    report = {}
    for part in ("params", "optim"):
        a, b = saved[part], loaded[part]
        report[part] = sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))
    report["n_optim"] = len(saved["optim"])
    report["rng"] = [k for k in ("torch", "numpy", "python")
                     if not (torch.equal(saved["rng"][k], loaded["rng"][k]) if k == "torch"
                             else repr(saved["rng"][k]) == repr(loaded["rng"][k]) if k == "python"
                             else all(np.array_equal(np.asarray(p), np.asarray(q))
                                      for p, q in zip(saved["rng"][k], loaded["rng"][k])))]
    report["sched"] = saved["sched"] == loaded["sched"]
    report["lr"] = saved["lr"] == loaded["lr"]
    report["global_steps"] = [saved["global_steps"], loaded["global_steps"]]
    report["continued"] = [ahead, [step(fresh) for _ in range(2)]]
    print("RESULT " + json.dumps(report))
""")


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_loaded_checkpoint_restores_every_state_the_next_step_reads(tmp_path):
    """Oracle: the state just before `checkpointing.save`. After `checkpointing.load` into an engine built with
    another seed (and stepped once), the weights, every ZeRO-2 optimizer tensor (fp32 partition, Adam moments,
    step), the LR schedule, the torch / numpy / python RNG and DeepSpeed's step count are those saved, and the
    next steps (dropout on) give the same losses to the last bit."""
    from _procs import free_port

    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, str(tmp_path), str(free_port())], capture_output=True,
                          text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1].removeprefix("RESULT "))
    assert got["params"] == [] and got["optim"] == [] and got["n_optim"] >= 3, got
    assert got["rng"] == [] and got["sched"] and got["lr"] and got["global_steps"] == [3, 3], got
    assert got["continued"][0] == got["continued"][1], got["continued"]
