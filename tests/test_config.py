"""Config tree: paper defaults, YAML + dotted overrides, and one clear error per bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ermgap.config import RunConfig, apply_overrides, flatten, load_config
from ermgap.errors import ConfigError, ErmgapWarning


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_paper_defaults():
    cfg = load_config(None)
    # Section 3.2 of the paper, value by value.
    assert cfg.optim.epochs == 20
    assert cfg.optim.effective_batch_size == 64
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.optim.weight_decay == pytest.approx(0.01)
    assert cfg.eval.patience == 5
    assert cfg.optim.seed == 42
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 32, 0.05)
    assert cfg.objective.p == 2
    assert (cfg.lam.init, cfg.lam.epsilon, cfg.lam.eta, cfg.lam.lam_max) == (0.0, 0.02, 0.5, 10.0)
    assert cfg.model.name_or_path == "Qwen/Qwen2-Audio-7B-Instruct"


def test_yaml_and_overrides_compose(tmp_path):
    p = write(tmp_path, "objective:\n  p: 1\nlambda:\n  eta: 0.25\noptim:\n  micro_batch_size: 8\n")
    cfg = load_config(p, ["lambda.eta=0.75", "lora.target_modules=[q_proj, v_proj]", "eval.every_steps=10"])
    assert cfg.objective.p == 1.0
    assert cfg.lam.eta == 0.75  # override wins over the file
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.eval.every_steps == 10
    assert cfg.grad_accum_steps == 64 // (8 * 2)


def test_round_trip_through_dump(tmp_path):
    cfg = load_config(None, ["objective.p=1", "lambda.mode=fixed", "lambda.init=5"])
    dumped = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert "lambda" in dumped and "lam" not in dumped
    again = RunConfig.model_validate(dumped)
    assert again == cfg
    flat = flatten(cfg.to_dict())
    assert flat["lambda.init"] == 5 and flat["objective.p"] == 1


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("optim:\n  lrr: 1\n", [], ["optim.lrr: unknown key", "did you mean 'optim.lr'"]),
        ("objectiv:\n  p: 1\n", [], ["objectiv: unknown key", "did you mean 'objective'"]),
        ("lambda:\n  epsilon: -0.1\n", [], ["lambda.epsilon", "greater than or equal to 0", "-0.1"]),
        ("lambda:\n  eta: -1\n", [], ["lambda.eta", "greater than or equal to 0"]),
        ("lambda:\n  lam_max: -1\n", [], ["lambda.lam_max", "greater than or equal to 0"]),
        ("objective:\n  p: 0\n", [], ["objective.p", "greater than 0"]),
        ("optim:\n  lr: 0\n", [], ["optim.lr", "greater than 0"]),
        ("optim:\n  lr: fast\n", [], ["optim.lr", "valid number", "'fast'"]),
        ("optim:\n  micro_batch_size: 5\n", [], ["effective_batch_size (64)", "5 × 2 = 10"]),
        ("", ["distributed.num_workers=3"], ["divisible", "4 × 3 = 12"]),
        ("data:\n  modality: video\n", [], ["data.modality", "'uni' or 'multi'"]),
        ("", ["lambda.mode=sometimes"], ["lambda.mode", "'adaptive' or 'fixed'"]),
        ("", ["objective.p"], ["must look like key=value"]),
        ("prompt:\n  verbalizers: {joy: happy}\n", [], ["prompt.verbalizers", "missing"]),
        ("", ["optim.lr=.inf"], ["optim.lr", "finite number"]),
        ("", ["optim.lr=.nan"], ["optim.lr", "finite number"]),
        ("", ["optim.lr=3"], ["optim.lr", "less than or equal to 1"]),
        ("", ["lambda.lam_max=.inf"], ["lambda.lam_max", "finite number"]),
        ("", ["lambda.eta=1e308"], ["lambda.eta", "less than or equal to 100", "1e308"]),
        ("", ["lambda.epsilon=-.inf"], ["lambda.epsilon", "finite number"]),
        ("", ["model.dtype=fp16"], ["model.dtype fp16 is refused for training", "model.dtype=bf16",
                                    "ermgap evaluate --dtype fp16"]),
        ("", ["eval.predict=generate"], ["eval.predict: 'generate' is not supported during training",
                                         "ermgap evaluate --mode generate"]),
    ],
)
def test_bad_values_are_named(tmp_path, text, overrides, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p, overrides)
    msg = str(err.value)
    assert str(p) in msg
    for piece in expected:
        assert piece in msg, msg


def test_all_problems_listed_at_once(tmp_path):
    p = write(tmp_path, "objective:\n  p: -1\nlambda:\n  eta: -1\noptim:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert "3 problems" in msg
    assert "objective.p" in msg and "lambda.eta" in msg and "optim.lrr" in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"optim": 3}, ["optim.lr=1"])


def test_cli_show_and_error_exit(tmp_path):
    good = write(tmp_path, "objective:\n  p: 1\n")
    out = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "config", "show", str(good), "lambda.eta=0.3"],
                         capture_output=True, text=True, check=True).stdout
    tree = yaml.safe_load(out)
    assert tree["objective"]["p"] == 1 and tree["lambda"]["eta"] == 0.3
    bad = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "config", "show", str(good), "optim.lr=-1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "optim.lr" in bad.stderr and "Traceback" not in bad.stderr


def test_empty_config_file_warns(tmp_path):
    empty = write(tmp_path, "# nothing here\n")
    with pytest.warns(ErmgapWarning, match=r"run\.yaml is empty: every setting takes its default .*Qwen2-Audio-7B"):
        cfg = load_config(empty)
    assert cfg == load_config(None)
    proc = subprocess.run([sys.executable, "-m", "ermgap.cli.main", "config", "show", str(empty)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "warning:" in proc.stderr and "is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_reference_states_gap_units_and_verbalizer_normalisation():
    """Δdev's units and how multi-token answers are normalised are stated where ε and the answers are set
    (test_model checks the behaviour: per_sample_loss averages, score_labels sums, terminator included)."""
    from ermgap.config import reference_markdown

    rows = {line.split("|")[1].strip(" `"): line for line in reference_markdown().splitlines()[2:]}
    assert "terminator" in rows["lambda.epsilon"] and "half the label-token loss gap" in rows["lambda.epsilon"]
    assert "nats" in rows["lambda.dev_gap"] and "fraction" in rows["lambda.dev_gap"]
    assert "MEAN cross-entropy" in rows["prompt.verbalizers"] and "SUM of their log-probabilities" in \
        rows["prompt.verbalizers"] and "not length-normalised" in rows["prompt.verbalizers"]
