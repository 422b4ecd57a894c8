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
def test_deepspeed_checkpoint_on_a_full_disk(tmp_path):
    from _procs import free_port

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a 2 MB tmpfs here ({mount.stderr.strip() or 'mount failed'}); needs root")
    try:
        proc = subprocess.run([sys.executable, "-c", SAVE_ON_FULL_DISK, str(disk), str(free_port())],
                              capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
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
