"""The Dockerfile, checked without Docker (no registry here): structure, pins vs pyproject, entrypoint.

A small parser (instructions with line continuations, comments, stages, ARG defaults) reads it; the
pins it repeats must equal pyproject.toml's and the Makefile's, and the image's command must run
`ermgap --help` in this Python environment.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = ("SECRET", "TOKEN", "KEY", "PASSWORD", "CREDENTIAL")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def expand(self, text: str, extra: dict[str, str] | None = None) -> str:
        values = {**self.global_args, **(extra or {})}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions (continuations joined, comments dropped) grouped into stages; ARGs before FROM are global."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are ignored by Docker too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    if buf:
        raise ValueError("Dockerfile ends inside a line continuation")
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in logical:
        instr, _, args = item.partition(" ")
        instr, args = instr.upper(), args.strip()
        if instr == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, flags=re.IGNORECASE)
            if not m:
                raise ValueError(f"bad FROM: {args}")
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages:
            if instr != "ARG":
                raise ValueError(f"{instr} before the first FROM")
            k, _, v = args.partition("=")
            global_args[k] = v.strip('"')
        else:
            stages[-1].instructions.append((instr, args))
    if not stages:
        raise ValueError("no FROM")
    return Dockerfile(global_args, stages)


def arg_defaults(stage: Stage) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (a.partition("=") for i, a in stage.instructions if i == "ARG") if v}


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", d.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


# --------------------------------------------------------------------------- the parser itself


def test_parser_on_a_known_dockerfile():
    df = parse_dockerfile(
        "# comment\nARG V=1.0\nFROM base:${V} AS b\nRUN a \\\n  # inner comment\n  && b\n\n"
        "ENV X=1 \\\n    Y=2\nFROM --platform=linux/amd64 final:${V}\nUSER app\nCMD [\"x\", \"--help\"]\n")
    assert df.global_args == {"V": "1.0"}
    assert [(s.base, s.name) for s in df.stages] == [("base:${V}", "b"), ("final:${V}", None)]
    assert df.stages[0].instructions == [("RUN", "a  && b"), ("ENV", "X=1  Y=2")]
    assert df.expand(df.stages[1].base) == "final:1.0"
    assert df.stages[1].instructions[-1] == ("CMD", '["x", "--help"]')
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM a\nRUN x \\\n")
    with pytest.raises(ValueError, match="before the first FROM"):
        parse_dockerfile("RUN x\nFROM a\n")


# --------------------------------------------------------------------------- the project's Dockerfile


def test_bases_are_pinned_cuda_pytorch_images(dockerfile):
    for stage in dockerfile.stages:
        image = dockerfile.expand(stage.base)
        assert "$" not in image, f"unresolved ARG in FROM {stage.base}"
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and "@" not in repo, f"unpinned base {image}"
        assert "cuda" in tag, f"not a CUDA image: {image}"
    builder, final = dockerfile.stages[0], dockerfile.stages[-1]
    assert len(dockerfile.stages) >= 2, "multi-stage: a build stage and a slim final stage"
    assert dockerfile.expand(builder.base).endswith("-devel"), "ops are built with nvcc from a -devel base"
    assert dockerfile.expand(final.base).endswith("-runtime"), "the final stage is the slim -runtime variant"


def test_torch_in_the_base_equals_the_makefile_pin(dockerfile):
    make = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", make, flags=re.M).group(1)
    assert dockerfile.global_args["TORCH_VERSION"] == torch_pin
    assert f"pytorch/pytorch:{torch_pin}-cuda" in dockerfile.expand(dockerfile.stages[-1].base)


def test_repeated_pins_equal_pyproject(dockerfile):
    pins = pyproject_pins()
    args = arg_defaults(dockerfile.stages[0])
    repeated = {"ray": "RAY_VERSION", "transformers": "TRANSFORMERS_VERSION", "peft": "PEFT_VERSION",
                "deepspeed": "DEEPSPEED_VERSION", "mlflow": "MLFLOW_VERSION"}
    for pkg, arg in repeated.items():
        assert pkg in pins, f"pyproject.toml no longer pins {pkg}"
        assert args.get(arg) == pins[pkg], f"Dockerfile {arg}={args.get(arg)} but pyproject pins {pkg}=={pins[pkg]}"
    make = (ROOT / "Makefile").read_text()
    ds_make = re.search(r"^DEEPSPEED_SPEC\s*\?=\s*deepspeed==(\S+)", make, flags=re.M)
    if ds_make:
        assert ds_make.group(1) == args["DEEPSPEED_VERSION"]
    # The build checks what pip installed against these ARGs.
    runs = " ".join(a for i, a in dockerfile.stages[0].instructions if i == "RUN")
    for arg in repeated.values():
        assert "${%s}" % arg in runs, f"{arg} is declared but never checked in the build"


def test_package_and_deepspeed_install(dockerfile):
    runs = [a for i, a in dockerfile.stages[0].instructions if i == "RUN"]
    ds = next(r for r in runs if "deepspeed==" in r)
    assert "--no-build-isolation" in ds
    for flag in ("DS_BUILD_CPU_ADAM=1", "DS_BUILD_FUSED_ADAM=1", "TORCH_CUDA_ARCH_LIST="):
        assert flag in ds, flag
    pkg = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert runs.index(ds) < pkg, "DeepSpeed must be installed (from torch, no isolation) before `pip install .`"
    copies = [a for i, a in dockerfile.stages[0].instructions if i == "COPY"]
    assert any("pyproject.toml" in c for c in copies) and any(c.split()[0] == "ermgap" for c in copies)


def test_every_copy_source_exists(dockerfile):
    for stage in dockerfile.stages:
        for instr, args in stage.instructions:
            if instr != "COPY" or "--from=" in args:
                continue
            srcs = [s for s in shlex.split(args) if not s.startswith("--")][:-1]
            for src in srcs:
                assert list(ROOT.glob(src)), f"COPY source {src} does not exist in the repo"


def test_final_stage_is_non_root_slim_and_secret_free(dockerfile):
    final = dockerfile.stages[-1]
    users = [a for i, a in final.instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage must run as a non-root user"
    assert not any(i == "HEALTHCHECK" for i, _ in final.instructions)
    for stage in dockerfile.stages:
        for instr, args in stage.instructions:
            if instr in ("ENV", "ARG"):
                for name in re.findall(r"(\w+)=", args) or [args.split()[0]]:
                    assert not any(w in name.upper() for w in SECRET_WORDS), f"{instr} {name}: no secrets in the image"
    cmd = next(a for i, a in reversed(final.instructions) if i == "CMD")
    assert json.loads(cmd) == ["ermgap", "--help"]
    assert not any(i == "ENTRYPOINT" for i, _ in final.instructions), "an ENTRYPOINT would swallow `ray start`"


def test_dockerignore_keeps_local_state_out():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for d in ("data/", "runs/", ".venv/", "models/", ".git/"):
        assert d in lines, d
    # Docker anchors patterns at the context root, so data/ does not drop the package's ermgap/data/.
    assert not any(ln.startswith("**/data") or ln == "ermgap/" for ln in lines)


def test_the_image_command_runs_here(dockerfile):
    cmd = json.loads(next(a for i, a in reversed(dockerfile.stages[-1].instructions) if i == "CMD"))
    exe = Path(sys.executable).parent / cmd[0]
    assert exe.is_file(), f"console script {cmd[0]} not installed in this environment ({exe})"
    r = subprocess.run([str(exe), *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for command in ("submit", "jobs", "sweep", "config"):
        assert command in r.stdout
