"""`--force` replaces an output only with one of the same kind (a run with a run, a sweep with a sweep, ...).

Every command that has --force is pointed at an output of another kind (or at something ermgap did not
write): it must refuse with one message naming what is there, exit 2, start nothing, and leave every file
as it was. In-process, no Ray, no model loaded: the refusals come before any work.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from ermgap.io import claim_dir
from test_user_errors import _one_error, run_cli

NAMES = {"run": "training run", "sweep": "sweep", "report": "report", "corpus": "corpus", "model": "model"}


def _output(root: Path, kind: str) -> Path:
    """A finished output of `kind` as ermgap leaves it (its marker and a file of its own)."""
    d = claim_dir(root / f"old_{kind}", kind, "demo" if kind == "sweep" else None)
    (d / "precious.txt").write_text(f"{kind} results")
    return d


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _preds(path: Path) -> Path:
    rows = [{"utt_id": f"u{i}", "language": "eng", "gender": "FM"[i % 2], "gold": "joy", "pred": "joy"}
            for i in range(4)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def _train(tmp: Path, target: Path) -> list[str]:
    cfg = tmp / "run.yaml"
    cfg.write_text("{}\n")
    return ["train", str(cfg), "--run-dir", str(target), "--force"]


def _sweep(tmp: Path, target: Path) -> list[str]:
    spec = tmp / "spec.yaml"  # its directory is <storage_path>/<name>: the target
    spec.write_text(yaml.safe_dump({
        "name": target.name, "base": {"data": {"manifest": "x.csv"}, "model": {"name_or_path": "m"}},
        "variants": {"erm": {"lambda.mode": "fixed"}}, "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "storage_path": str(target.parent), "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"}}))
    return ["sweep", str(spec), "--force"]


def _evaluate(tmp: Path, target: Path) -> list[str]:
    return ["evaluate", "--model", "m", "--manifest", "x.csv", "--out", str(target), "--force"]


def _report(tmp: Path, target: Path) -> list[str]:
    return ["report", "--preds", f"sys:uni:{_preds(tmp / 'preds.csv')}", "--out", str(target), "--force"]


def _benchmark(tmp: Path, target: Path) -> list[str]:
    systems = tmp / "systems.yaml"
    systems.write_text(yaml.safe_dump({"systems": [{"name": "s", "backend": "qwen2_audio", "model": "m"}]}))
    # --out is the benchmark's folder; --force replaces its report/ only
    return ["benchmark", str(systems), "--manifest", "x.csv", "--out", str(target.parent), "--force"]


def _synth(tmp: Path, target: Path) -> list[str]:
    return ["data", "synth", "--out", str(target), "--per-cell", "1", "--force"]


def _meld(tmp: Path, target: Path) -> list[str]:
    return ["data", "import-meld-st", str(tmp), "--out", str(target), "--force"]


def _tiny(tmp: Path, target: Path) -> list[str]:
    return ["model", "tiny", "--out", str(target), "--force"]


def _pretrain(tmp: Path, target: Path) -> list[str]:
    return ["model", "tiny", "--pretrain", "--out", str(target), "--force"]


# (command, its output kind, the kind of output it is pointed at): each command meets another kind, and every
# kind is met by some command.
CASES = [
    (_train, "run", "sweep"),          # the reported case: a finished sweep replaced by one training run
    (_sweep, "sweep", "run"),
    (_report, "report", "corpus"),
    (_benchmark, "report", "model"),
    (_synth, "corpus", "model"),
    (_meld, "corpus", "report"),
    (_tiny, "model", "corpus"),
    (_pretrain, "model", "run"),
]


@pytest.mark.parametrize(("command", "own", "there"), CASES, ids=[f"{c[0].__name__[1:]}-over-{c[2]}" for c in CASES])
def test_force_refuses_an_output_of_another_kind(tmp_path, monkeypatch, capsys, command, own, there):
    import ray

    old = _output(tmp_path / "outputs", there)
    target = old.parent / "report" if command is _benchmark else old
    if command is _benchmark:
        old.rename(target)
    before = _snapshot(tmp_path / "outputs")
    line = _one_error(*run_cli(monkeypatch, capsys, *command(tmp_path, target)))
    what = NAMES[there] + (" demo" if there == "sweep" else "")
    assert f"{target} holds a {NAMES[there]} ({what} written by ermgap), not a {NAMES[own]}: --force only " \
           f"replaces a {NAMES[own]} with a {NAMES[own]}" in line, line
    assert _snapshot(tmp_path / "outputs") == before
    assert not ray.is_initialized()


@pytest.mark.parametrize("command", [_train, _sweep, _report, _synth, _tiny], ids=lambda c: c.__name__[1:])
def test_force_refuses_a_folder_ermgap_did_not_write(tmp_path, monkeypatch, capsys, command):
    mine = tmp_path / "outputs" / "thesis"
    mine.mkdir(parents=True)
    (mine / "chapter1.tex").write_text("precious")
    line = _one_error(*run_cli(monkeypatch, capsys, *command(tmp_path, mine)))
    assert f"{mine} is not a " in line and "ermgap created (no .ermgap-output marker in it); --force only replaces " \
                                           "ermgap's own outputs" in line, line
    assert _snapshot(tmp_path / "outputs") == {"thesis/chapter1.tex": b"precious"}


def test_evaluate_force_replaces_only_a_predictions_file(tmp_path, monkeypatch, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("utt_id,split,language,emotion,speaker,gender,transcript,audio\nu,train,eng,joy,s,F,,a.wav\n")
    folder = _output(tmp_path, "run")
    for target, what in ((manifest, "is not a predictions file (its header: utt_id, split, language, emotion"),
                         (folder, "is a directory, not a predictions file")):
        before = _snapshot(tmp_path)
        line = _one_error(*run_cli(monkeypatch, capsys, *_evaluate(tmp_path, target)))
        assert f"--out {target} {what}" in line and "--force only replaces a predictions file" in line, line
        assert _snapshot(tmp_path) == before
    # A predictions file is replaced: the refusal comes after, at the unknown model (nothing was read yet).
    preds = _preds(tmp_path / "preds.csv")
    code, out = run_cli(monkeypatch, capsys, *_evaluate(tmp_path, preds))
    assert "predictions file" not in _one_error(code, out)
