"""Hostile but realistic input through the CLI: every case ends in one clear message (exit 2, no traceback)
or in the right behaviour, and nothing on disk changes. Pure cases (no Ray, no model) run in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
from test_data_manifest import write_valid


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from ermgap.cli.main import main

    monkeypatch.setattr(sys, "argv", ["ermgap", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out + out.err


def _one_error(code: int, out: str) -> str:
    """The single `error:` line of a failed command (asserting exit 2 and no traceback)."""
    assert code == 2, out
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


# ------------------------------------------------------------------------- a stray comma in a manifest row


def _stray_comma(path: Path, row: int, extra: str = "oops") -> None:
    """Append `,extra` to data row `row` (1-based) of a CSV, as a hand edit would."""
    lines = path.read_text().splitlines()
    lines[row] += f",{extra}"
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("row", [1, 7])  # an extra field in the first data row changes how pandas reads the file
@pytest.mark.parametrize("extra", ["", "x,y"])  # one (empty) or two extra fields
def test_a_manifest_row_with_extra_fields_is_named(tmp_path, monkeypatch, capsys, row, extra):
    path = write_valid(tmp_path / "corpus")
    _stray_comma(path, row, extra)
    n_fields = len(REQUIRED) + 1 + extra.count(",") + 1  # the valid manifest also has duration_s
    for args in (["data", "validate", str(path)], ["data", "stats", str(path)]):
        code, out = run_cli(monkeypatch, capsys, *args)
        _one_error(code, out)
        assert f"row {row} (line {row + 1}): has {n_fields} fields but the header has {len(REQUIRED) + 1}" in out, out


REQUIRED = ("utt_id", "split", "language", "emotion", "speaker", "gender", "transcript", "audio")  # + duration_s


def test_train_refuses_a_manifest_row_with_extra_fields_before_ray(tmp_path, monkeypatch, capsys, tiny_model):
    import ray

    path = write_valid(tmp_path / "corpus")
    _stray_comma(path, 1)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    code, out = run_cli(monkeypatch, capsys, "train", str(cfg), f"data.manifest={path}",
                        f"model.name_or_path={tiny_model}", f"tracking.storage_path={tmp_path}/runs",
                        "--run-dir", str(tmp_path / "run"))
    _one_error(code, out)
    assert "row 1 (line 2): has 10 fields but the header has 9" in out, out
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_the_manifest_reader_gives_the_same_rows_as_written(tmp_path):
    """The field-count check reads quoted fields (commas and newlines inside a transcript) as CSV does."""
    from ermgap.data.manifest import read_manifest

    path = write_valid(tmp_path / "corpus")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[0, "transcript"] = 'she said "no, not\nthat"'
    df.to_csv(path, index=False)
    got = read_manifest(path)
    assert got.loc[0, "transcript"] == 'she said "no, not\nthat"' and len(got) == len(df)


# ------------------------------------------------------------------------- predictions without gold


@pytest.mark.parametrize("drop", ["gold", "pred"])
def test_metrics_on_predictions_without_a_required_column(tmp_path, monkeypatch, capsys, drop):
    preds = tmp_path / "preds.csv"
    rows = [{"utt_id": f"u{i}", "language": "eng", "gender": "FM"[i % 2], "gold": "joy", "pred": "joy"}
            for i in range(4)]
    pd.DataFrame(rows).drop(columns=[drop]).to_csv(preds, index=False)
    line = _one_error(*run_cli(monkeypatch, capsys, "metrics", str(preds)))
    assert str(preds) in line and f"'{drop}'" in line and "missing" in line, line
    out = tmp_path / "report"
    line = _one_error(*run_cli(monkeypatch, capsys, "report", "--preds", f"sys:uni:{preds}", "--out", str(out)))
    assert f"'{drop}'" in line and "missing" in line, line
    assert not out.exists()


def test_metrics_on_predictions_whose_first_row_has_an_extra_field(tmp_path, monkeypatch, capsys):
    preds = tmp_path / "preds.csv"
    preds.write_text("utt_id,language,gender,gold,pred\nu0,eng,F,joy,joy,\nu1,eng,M,joy,anger\n")
    line = _one_error(*run_cli(monkeypatch, capsys, "metrics", str(preds)))
    assert "data row 1 (CSV line 2) has more fields than the header" in line, line


# ------------------------------------------------------------------------- a tracking store that is not there


@pytest.mark.parametrize("where", ["nonexistent/x.db", "x.db"])  # a missing folder, or only a missing file
def test_reading_commands_refuse_a_tracking_store_that_does_not_exist(tmp_path, monkeypatch, capsys, where):
    db = tmp_path / where
    uri = f"sqlite:///{db}"
    for args in (["runs", "list", "--tracking-uri", uri],
                 ["report", "--runs", "abcd1234", "--tracking-uri", uri, "--out", str(tmp_path / "rep")],
                 ["ui", "--tracking-uri", uri]):
        line = _one_error(*run_cli(monkeypatch, capsys, *args))
        assert f"--tracking-uri {uri}: no MLflow store there" in line, (args, line)
    assert not db.exists() and not (tmp_path / "rep").exists()


# ------------------------------------------------------------------------- config files


def test_a_config_with_a_duplicated_key_is_refused_naming_both_lines(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim:\n  lr: 1.0e-4\nlora:\n  r: 8\noptim:\n  epochs: 3\n")
    line = _one_error(*run_cli(monkeypatch, capsys, "config", "show", str(cfg)))
    assert f"{cfg}: key 'optim' appears twice (lines 1 and 5)" in line, line
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 3.0e-4\n")
    line = _one_error(*run_cli(monkeypatch, capsys, "config", "show", str(nested)))
    assert "key 'optim.lr' appears twice (lines 2 and 4)" in line, line
    spec = tmp_path / "sweep.yaml"  # a sweep spec is read the same way
    spec.write_text("name: s\nname: t\nbase: {}\n")
    line = _one_error(*run_cli(monkeypatch, capsys, "sweep", str(spec), "--dry-run"))
    assert "key 'name' appears twice (lines 1 and 2)" in line, line


def test_config_show_on_a_folder_says_it_is_a_folder(tmp_path, monkeypatch, capsys):
    line = _one_error(*run_cli(monkeypatch, capsys, "config", "show", str(tmp_path)))
    assert f"{tmp_path} is a directory, not a config YAML file" in line, line
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 1.0e-4\n")  # a run directory: point at its config
    line = _one_error(*run_cli(monkeypatch, capsys, "config", "show", str(tmp_path)))
    assert f"did you mean {tmp_path / 'config.yaml'}" in line, line
    line = _one_error(*run_cli(monkeypatch, capsys, "config", "show", str(tmp_path / "nope.yaml")))
    assert f"{tmp_path / 'nope.yaml'}: config file not found" in line, line


# ------------------------------------------------------------------------- a hub id without the hub


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_that_cannot_be_fetched_is_one_clear_error_at_once(tmp_path, monkeypatch, capsys, offline):
    """This machine reaches no model hub: a hub-like id that is not in the local cache is refused at the first
    look (offline mode on, or the hub does not answer), without the hub client's retry lines."""
    import huggingface_hub.constants
    import huggingface_hub.utils  # noqa: F401  (the CLI's quiet_console reaches it as an attribute)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    path = write_valid(tmp_path / "corpus")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    code, out = run_cli(monkeypatch, capsys, "train", str(cfg), f"data.manifest={path}",
                        "model.name_or_path=ermgap-test/not-a-model", f"tracking.storage_path={tmp_path}/runs")
    line = _one_error(code, out)
    assert "model.name_or_path: ermgap-test/not-a-model is not a local directory and not in the Hugging Face " \
           "cache" in line, line
    assert ("offline mode is on (HF_HUB_OFFLINE)" if offline else "cannot be reached") in line, line
    assert "Retry" not in out and "thrown while requesting" not in out, out


# ------------------------------------------------------------------------- features build with no cache to fill


@pytest.mark.parametrize(("override", "reason"), [
    ("lora.train_audio_encoder=true", "lora.train_audio_encoder is true: the audio encoder is trained, so its "
                                      "output changes every step and is never cached"),
    ("data.feature_cache=off", "data.feature_cache is off in this config"),
])
def test_features_build_without_a_cache_says_why_before_ray(tmp_path, monkeypatch, capsys, tiny_model, override,
                                                           reason):
    import ray

    cfg = tmp_path / "run.yaml"
    cfg.write_text("{}\n")
    line = _one_error(*run_cli(monkeypatch, capsys, "features", "build", str(cfg), override,
                               f"data.manifest={write_valid(tmp_path / 'corpus')}", f"model.name_or_path={tiny_model}",
                               "optim.effective_batch_size=4", "optim.micro_batch_size=2"))
    assert f"nothing to build: {reason}" in line, line
    assert not ray.is_initialized()
