"""Sweep specs: validation before Ray starts, shipped specs, dry-run, selection rule (no Ray, seconds)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from ermgap.config import load_config
from ermgap.errors import ConfigError, OutputExistsError
from ermgap.sweep.spec import load_sweep_spec

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "sweeps"
TINY = ROOT / "configs" / "tiny.yaml"


def _spec(tmp_path: Path, **changes) -> Path:
    """A small valid spec file (inline base) with top-level keys replaced by `changes`."""
    tree = {
        "name": "t",
        "base": {"data": {"manifest": "x.csv"}, "model": {"name_or_path": "m"},
                 "optim": {"effective_batch_size": 16, "micro_batch_size": 4}},
        "variants": {"erm": {"lambda.mode": "fixed", "lambda.init": 0.0},
                     "adaptive": {"lambda.mode": "adaptive"}},
        "space": {"optim.lr": {"grid": [1e-4, 3e-4]}},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
        "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    tree.update(changes)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _error(path: Path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_sweep_spec(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------- errors


def test_unknown_search_key_is_named_with_suggestion(tmp_path):
    msg = _error(_spec(tmp_path, space={"lambda.epsilonn": {"grid": [0.01]}}))
    assert "spec.yaml" in msg and "space" in msg and "'lambda.epsilonn'" in msg
    assert "did you mean 'lambda.epsilon'" in msg


def test_section_instead_of_value_is_refused(tmp_path):
    msg = _error(_spec(tmp_path, space={"optim": {"grid": [1]}}))
    assert "'optim' is a config section" in msg


def test_unknown_spec_key_and_unknown_variant_key(tmp_path):
    assert "schedular: unknown key (did you mean 'scheduler'?)" in _error(_spec(tmp_path, schedular={}))
    msg = _error(_spec(tmp_path, variants={"a": {"lambda.eat": 1}}))
    assert "variants.a" in msg and "did you mean 'lambda.eta'" in msg


def test_a_training_key_without_base_prefix_is_named_with_the_fix(tmp_path):
    """`ermgap sweep spec.yaml optim.epochs=2` (a key as on `ermgap train`) was refused as "optim: unknown key",
    naming neither the key nor the spelling that works."""
    msg = _error(_spec(tmp_path), ["optim.epochz=3"])
    assert "'optim.epochz' is a training config key" in msg and "base.optim.epochz=3" in msg
    assert "did you mean 'optim.epochs'" in _error(_spec(tmp_path), ["base.optim.epochz=3"])


def test_empty_grid_and_empty_seeds(tmp_path):
    msg = _error(_spec(tmp_path, space={"optim.lr": {"grid": []}}))
    assert "space.optim.lr" in msg and "at least one value" in msg
    assert "seeds" in _error(_spec(tmp_path, seeds=[]))


def test_invalid_value_names_trial_and_key(tmp_path):
    msg = _error(_spec(tmp_path, space={"lambda.eta": {"grid": [0.5, -1.0]}}))
    assert "lambda.eta" in msg and "-1.0" in msg and "greater than or equal to 0" in msg


def test_every_grid_point_is_validated(tmp_path):
    # Each value is valid alone; only the combination micro_batch=3 (16 % 3 != 0) fails the cross-field check.
    msg = _error(_spec(tmp_path, space={"optim.micro_batch_size": {"grid": [4, 3]}}))
    assert "optim.micro_batch_size=3" in msg and "divisible" in msg


def test_sampled_ranges_are_probed_at_both_ends(tmp_path):
    msg = _error(_spec(tmp_path, algorithm="random", space={"lora.dropout": {"uniform": [0.1, 1.5]}}))
    assert "lora.dropout" in msg and "1.5" in msg
    assert "low < high" in _error(_spec(tmp_path, algorithm="random", space={"optim.lr": {"uniform": [1.0, 0.1]}}))
    assert "low > 0" in _error(_spec(tmp_path, algorithm="random", space={"optim.lr": {"loguniform": [0, 1]}}))


def test_algorithm_consistency(tmp_path):
    assert "use `choice`" in _error(_spec(tmp_path, algorithm="optuna_tpe"))
    assert "grid dimensions only" in _error(_spec(tmp_path, space={"optim.lr": {"choice": [1e-4]}}))
    assert "two or more objectives" in _error(
        _spec(tmp_path, algorithm="optuna_multi", space={"optim.lr": {"loguniform": [1e-5, 1e-3]}}))
    assert "unknown metric" in _error(_spec(tmp_path, selection={"metric": "dev_f1"}))


def test_impossible_resources_refused_before_ray_starts(tmp_path):
    import ray

    from ermgap.sweep import run_sweep

    path = _spec(tmp_path, resources={"num_workers": 2, "cpus_per_worker": 4096})
    with pytest.raises(ConfigError, match=r"needs 8192\.1 CPU.*this machine has"):
        run_sweep(path)
    assert not ray.is_initialized()
    assert not (tmp_path / "sweeps").exists()


def test_gpu_trial_refused_on_machine_without_gpu(tmp_path):
    import torch

    from ermgap.sweep import run_sweep

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="GPU"):
        run_sweep(_spec(tmp_path, resources={"num_workers": 1, "gpus_per_worker": 1}))


def test_existing_sweep_needs_resume_or_force_and_resume_needs_state(tmp_path):
    from ermgap.sweep import run_sweep

    path = _spec(tmp_path)
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(path, resume=True)
    (tmp_path / "sweeps" / "t").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="--resume .* or --force"):
        run_sweep(path)


# --------------------------------------------------------------------------- expansion


def test_trial_config_equals_independently_loaded_config():
    """Oracle: config.load_config(base, dotted overrides) built by hand for one demo trial."""
    spec = load_sweep_spec(SWEEPS / "demo.yaml")
    got = spec.trial_config({"variant": "minmaxgap", "optim.seed": 42})
    want = load_config(TINY, ["data.manifest=data/bias_lab/positive/manifest.csv",
                              "model.name_or_path=models/tiny-pretrained", "lora.train_audio_encoder=false",
                              "optim.epochs=12", "optim.lr=1e-3", "optim.scheduler=cosine",
                              "optim.effective_batch_size=24", "optim.micro_batch_size=8",
                              "eval.patience=0", "eval.batch_size=32", "distributed.num_workers=1",
                              "distributed.cpus_per_worker=0.9", "distributed.use_gpu=false",
                              "objective.kind=minmaxgap", "lambda.mode=adaptive", "lambda.init=0.0", "objective.p=2",
                              "lambda.lam_max=0.6", "data.sampler=stratified", "data.min_per_cell=4",
                              "optim.seed=42"])
    assert got.to_dict() == want.to_dict()
    # The zero-shot trial is the same config with nothing trained.
    zero = spec.trial_config({"variant": "zero_shot", "optim.seed": 42}).to_dict()
    assert zero["optim"]["epochs"] == 0 and zero["model"] == want.to_dict()["model"]


def test_the_demo_runs_the_bias_labs_rows_on_its_positive_control():
    """The demo's trained rows are the bias lab's rows on the corpus and backbone the lab builds: each demo trial
    equals the lab's trial of the same row and seed (sweeps/bias_lab.yaml expanded by the lab's own driver), and its
    corpus is the lab's positive control, cue-shifted and under-represented."""
    from ermgap.bias_lab.corpora import CONTROLS
    from ermgap.bias_lab.run import LabSettings, lab_spec

    settings = LabSettings(corpora=("positive",), seed_list=(42,))
    root = Path(settings.data_root)
    lab = lab_spec(settings, {"positive": (root / "positive" / "manifest.csv",
                                           root / "positive_oracle" / "manifest.csv")})
    demo = load_sweep_spec(SWEEPS / "demo.yaml")
    assert [p["optim.seed"] for p in demo.example_trials()] == [42] * 4
    for row in ("erm", "minmaxgap", "group_dro"):
        got = demo.trial_config({"variant": row, "optim.seed": 42}).to_dict()
        want = lab.trial_config({"variant": f"positive.{row}", "optim.seed": 42}).to_dict()
        got.pop("tracking"), want.pop("tracking")  # each its own MLflow experiment
        assert got == want, row
    positive = next(c for c in CONTROLS if c.name == "positive")
    assert positive.cue_shift and positive.train_share and not positive.bias
    assert demo.first_trial_config().model.name_or_path == settings.backbone


def test_grid_is_the_cartesian_product(tmp_path):
    spec = load_sweep_spec(_spec(tmp_path, seeds=[1, 2, 3]))
    points = spec.example_trials()
    want = [{"variant": v, "optim.lr": lr, "optim.seed": s}
            for v, lr, s in itertools.product(["erm", "adaptive"], [1e-4, 3e-4], [1, 2, 3])]
    assert points == want
    assert spec.trial_config(points[-1]).optim.seed == 3


def test_cli_overrides(tmp_path):
    path = _spec(tmp_path)
    spec = load_sweep_spec(path, ["base.optim.epochs=2", "space.lambda.eta=[0.25, 0.5, 1.0]",
                                  "max_concurrent_trials=1", "variants.erm.lambda.init=0.5"])
    assert spec.num_trials() == 2 * 2 * 3
    assert spec.model.max_concurrent_trials == 1
    cfg = spec.trial_config({"variant": "erm", "optim.lr": 1e-4, "lambda.eta": 1.0})
    assert (cfg.optim.epochs, cfg.lam.eta, cfg.lam.init) == (2, 1.0, 0.5)
    assert "did you mean 'optim.epochs'" in _error(path, ["base.optim.epoch=2"])


def test_spec_hash_changes_with_overrides(tmp_path):
    path = _spec(tmp_path)
    assert load_sweep_spec(path).hash() == load_sweep_spec(path).hash()
    assert load_sweep_spec(path).hash() != load_sweep_spec(path, ["base.optim.epochs=2"]).hash()


# --------------------------------------------------------------------------- shipped specs


@pytest.mark.parametrize("name,trials", [("demo", 4), ("synth_lm", 5), ("paper_main", 3 * 2), ("paper_ablation", 5 * 2 * 2),
                                         ("fairness_grid", 3 * 3 * 3), ("compare_objectives", 6 * 3),
                                         ("pareto_minmaxgap", 6), ("pareto_constrained", 6),
                                         ("pareto_adversarial", 6)])
def test_shipped_specs_validate_and_dry_run(name, trials):
    from typer.testing import CliRunner

    from ermgap.cli.main import app

    spec = load_sweep_spec(SWEEPS / f"{name}.yaml")
    assert spec.num_trials() == trials
    result = CliRunner().invoke(app, ["sweep", str(SWEEPS / f"{name}.yaml"), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"{trials} trials" in result.output and "resources:" in result.output


@pytest.mark.parametrize("kind,row", [("minmaxgap", "minmaxgap"), ("constrained", "minmaxgap"), ("adversarial", "erm")])
def test_pareto_specs_run_the_bias_labs_recipe_on_its_positive_control(kind, row):
    """Each family's front is measured where a gap can be closed, with the lab's recipe: every key of the lab's
    base (sweeps/bias_lab.yaml) and the batches of the lab row named (MinMaxGAP's group-balanced ones for both
    gap penalties, ERM's for the adversary) equal the Pareto spec's."""
    lab = load_sweep_spec(SWEEPS / "bias_lab.yaml")
    spec = load_sweep_spec(SWEEPS / f"pareto_{kind}.yaml")
    got, want = spec.trial_config(spec.example_trials()[0]), lab.trial_config({"variant": row})
    assert got.objective.kind == kind and got.data.manifest == "data/bias_lab/positive/manifest.csv"
    for key in [*lab.raw["overrides"], "data.sampler", "data.min_per_cell", "optim.seed"]:
        section, _, name = key.partition(".")
        section = {"lambda": "lam"}.get(section, section)
        assert getattr(getattr(got, section), name) == getattr(getattr(want, section), name), key
    assert (spec.model.num_samples, spec.model.search_seed, spec.model.max_concurrent_trials) == (6, 0, 2)


def test_paper_specs_use_paper_hyperparameters():
    spec = load_sweep_spec(SWEEPS / "paper_main.yaml")
    cfg = spec.trial_config({"variant": "erm_minmaxgap", "data.modality": "multi"})
    assert cfg.model.name_or_path == "Qwen/Qwen2-Audio-7B-Instruct"
    assert (cfg.optim.epochs, cfg.optim.effective_batch_size, cfg.optim.lr, cfg.optim.weight_decay) == (20, 64, 5e-5, 0.01)
    # The paper's patience of 5 epochs, counted in evaluations: 5 per epoch (73 of MELD-ST's 365 steps).
    assert (cfg.eval.every_steps, cfg.eval.patience) == (73, 25) and cfg.eval.patience * cfg.eval.every_steps == 5 * 365
    assert (cfg.optim.seed, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (42, 16, 32, 0.05)
    assert (cfg.objective.p, cfg.lam.mode, cfg.lam.init, cfg.lam.epsilon, cfg.lam.eta, cfg.lam.lam_max) == \
        (2, "adaptive", 0.0, 0.02, 0.5, 10.0)
    assert cfg.distributed.use_gpu
    abl = load_sweep_spec(SWEEPS / "paper_ablation.yaml")
    lams = sorted({(abl.trial_config(p).lam.mode, abl.trial_config(p).lam.init) for p in abl.example_trials()})
    assert lams == [("adaptive", 0.0), ("fixed", 0.0), ("fixed", 1.0), ("fixed", 5.0), ("fixed", 10.0)]


# --------------------------------------------------------------------------- selection rule


def test_ui_host_check():
    from ermgap.loopback import is_loopback_host as _is_loopback

    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")


def test_optuna_multi_objective_search_space_converts(tmp_path):
    """The Tune space built from a spec is accepted by Optuna (multi-objective), and randint's upper
    bound is inclusive as documented."""
    from ermgap.sweep.tune import param_space, search_alg

    spec = load_sweep_spec(_spec(tmp_path, algorithm="optuna_multi", num_samples=6,
                                 objectives={"dev_w_f1": "max", "dev_avg_gap": "min"},
                                 space={"optim.lr": {"loguniform": [1e-5, 1e-3]},
                                        "lambda.eta": {"choice": [0.25, 0.5]},
                                        "lora.r": {"randint": [4, 5]}}))
    alg = search_alg(spec)
    assert alg.set_search_properties(None, None, param_space(spec))
    seen = set()
    for i in range(6):
        params = alg.suggest(f"t{i}")
        assert set(params) == {"variant", "optim.lr", "lambda.eta", "lora.r"}
        assert 1e-5 <= params["optim.lr"] <= 1e-3 and params["lambda.eta"] in (0.25, 0.5)
        spec.trial_config(params)  # every suggestion is a valid RunConfig
        seen.add(params["lora.r"])
    assert seen <= {4, 5}


def test_force_keeps_the_previous_sweep_when_a_check_fails(tmp_path):
    """`ermgap sweep --force` with impossible resources is refused before the previous sweep is touched."""
    from ermgap.io import claim_dir
    from ermgap.sweep import run_sweep

    old = claim_dir(tmp_path / "sweeps" / "t", "sweep", "t")
    (old / "sweep_state.json").write_text('{"parent_run_id": "abc"}')
    spec = _spec(tmp_path, resources={"num_workers": 1, "cpus_per_worker": 512.0})
    with pytest.raises(ConfigError, match="a trial needs 512.1 CPU"):
        run_sweep(spec, force=True)
    assert (old / "sweep_state.json").read_text() == '{"parent_run_id": "abc"}'


def test_demo_seeds_spec_trains_every_objective_on_stratified_batches_over_three_seeds():
    from typer.testing import CliRunner

    from ermgap.cli.main import app

    spec = load_sweep_spec(SWEEPS / "demo_seeds.yaml")
    assert spec.num_trials() == 4 * 3 and spec.model.seeds == [42, 43, 44]
    kinds = set()
    for point in spec.example_trials():
        cfg = spec.trial_config(point)
        kinds.add(cfg.objective.kind)
        assert (cfg.data.sampler, cfg.data.min_per_cell, cfg.objective.erm_weighting) == ("stratified", 2, "population")
        assert (cfg.lam.eta, cfg.eval.every_steps, cfg.eval.patience) == (0.5, 17, 0)  # the paper's η, 16 updates
    assert kinds == {"erm", "minmaxgap", "reweight", "group_dro"}
    result = CliRunner().invoke(app, ["sweep", str(SWEEPS / "demo_seeds.yaml"), "--dry-run"], terminal_width=200)
    assert result.exit_code == 0 and "12 trials" in result.output, result.output


def test_relative_paths_in_variants_resolve_against_the_driver_cwd(tmp_path, monkeypatch):
    """A variant that names its own corpus (the bias lab's oracle row) with a relative path: trials start in Tune's
    working directories, so the sweep ships it absolute, as it does the base config's paths."""
    from ermgap.sweep.run import run_sweep

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    spec = load_sweep_spec(_spec(tmp_path, variants={"erm": {"lambda.mode": "fixed"},
                                                     "other": {"data.manifest": "data/other.csv",
                                                               "model.name_or_path": "data"}}))
    run_sweep(spec, dry_run=True)
    cfg = spec.trial_config({"variant": "other", "optim.lr": 1e-4})
    assert cfg.data.manifest == str(tmp_path / "data" / "other.csv")
    assert cfg.model.name_or_path == str(tmp_path / "data")
    assert spec.trial_config({"variant": "erm", "optim.lr": 1e-4}).data.manifest == str(tmp_path / "x.csv")
