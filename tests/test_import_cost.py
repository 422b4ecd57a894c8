"""What an entry point loads when it is imported: a process pays seconds and hundreds of MB for every heavy
library it imports, whether it uses it or not.

- `ermgap.cli.main` is imported by every `ermgap` command (`--help`, `data validate`, `config show`, a refused
  argument): torch, Ray, MLflow and the model stack are for the commands that use them (torch alone is ~2.6 s;
  the config imports the objective kinds for their settings, and their math imports torch on first use).
- `ermgap.driver` is what `ermgap train`'s driver imports, and `ermgap.sweep.tune` what each of a sweep's trial
  drivers (a Ray task per trial) imports: they build and watch a TorchTrainer and never run a model, so
  transformers, peft and DeepSpeed stay in the Train workers (the driver's pre-flight imports transformers only
  when it opens the model's processor, and only for a model directory that has not passed that check before).

Each import runs in a fresh interpreter; the check is sys.modules after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ermgap.config import ModelConfig
from ermgap.errors import ConfigError
from ermgap.preflight import check_model_once

REPO = Path(__file__).resolve().parent.parent
MODEL_STACK = ("transformers", "peft", "deepspeed")
NOT_LOADED = {
    "ermgap.cli.main": ("torch", "ray", "mlflow", *MODEL_STACK),
    "ermgap.driver": MODEL_STACK,
    "ermgap.sweep.tune": MODEL_STACK,
}


@pytest.mark.parametrize("module", sorted(NOT_LOADED))
def test_importing_an_entry_point_leaves_out_what_it_does_not_use(module):
    code = (f"import json, sys, {module}; "
            f"print(json.dumps(sorted(m for m in {list(NOT_LOADED[module])!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"importing {module} loaded these"


def test_a_model_directory_checked_before_loads_no_transformers_into_the_driver(tiny_model, tmp_path, monkeypatch):
    """The pre-flight's model check (config + processor) is what loads transformers into a driver: a directory that
    passed it, unchanged since, is not checked again (ermgap.preflight.check_model_once); a changed file is."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    check_model_once(ModelConfig(name_or_path=str(model)))  # checked here, in this process
    code = ("import json, sys; from ermgap.config import ModelConfig; from ermgap.preflight import check_model_once; "
            f"check_model_once(ModelConfig(name_or_path={str(model)!r})); print(json.dumps('transformers' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) is False, "a driver checking that directory again loaded it"
    (model / "processor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load the processor"):
        check_model_once(ModelConfig(name_or_path=str(model)))


def test_every_deferred_import_of_ermgap_names_exists():
    """Imports inside functions (deferred so that entry points stay light) fail only when the function runs: each
    `from ermgap.X import name` anywhere in the package must name something X has (a moved helper left `ermgap ui`
    importing it from its old module)."""
    import ast
    import importlib

    missing = []
    for path in sorted((REPO / "ermgap").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ermgap"):
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(REPO)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                            if a.name != "*" and not hasattr(module, a.name)
                            and not (hasattr(module, "__path__")  # a package's submodule is found, not an attribute
                                     and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert missing == []


def test_the_suites_process_runs_torch_on_one_thread():
    """conftest sets OMP_NUM_THREADS=1 before anything imports torch (torch reads it once, at import): the pure
    tests' tiny tensors ran 10-17x slower with a second thread that only waits (the toy probe test 190 s -> 17 s)."""
    import torch

    assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1


@pytest.mark.parametrize(("argv", "named"), [
    (["train", "configs/tiny.yaml", "optim.epochz=3"], "epochz"),
    (["bias-lab", "--data-root", "{tmp}/lab", "--row", "erm", "--row", "bogus"], "bogus"),
    (["sweep", "sweeps/demo.yaml", "base.optim.epochz=3"], "optim.epochz"),
], ids=["train", "bias-lab", "sweep"])
def test_a_refused_setting_is_reported_before_torch_ray_or_mlflow_load(argv, named, tmp_path):
    """A mistyped key or value is the commonest error: the command reports it (exit 2) before importing what a
    run needs (torch, Ray, MLflow: seconds), so the user waits about a second for it."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = (f"import json, runpy, sys; sys.argv = ['ermgap', *{argv!r}]\n"
            "try:\n    runpy.run_module('ermgap.cli.main', run_name='__main__')\nexcept SystemExit as e:\n"
            "    print(json.dumps([e.code, sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [2, []], out.stdout[-2000:] + out.stderr[-2000:]
    assert named in out.stderr and "Traceback" not in out.stderr
