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
