# syntax=docker/dockerfile:1
# ermgap GPU image: the package with its pinned dependencies, DeepSpeed with CUDA ops prebuilt,
# espeak-ng for the synthetic corpus. Also the Ray head/worker image of cluster/ (KubeRay, launcher).
#
#   docker build -t ermgap:0.1.0 .
#   docker run --rm ermgap:0.1.0                                   # = ermgap --help
#   docker run --rm --gpus all ermgap:0.1.0 python bench/gpu_step.py
#   docker run --rm --gpus all -p 127.0.0.1:8265:8265 ermgap:0.1.0 ray start --head --block ...
#
# Base: the official PyTorch CUDA image pinned to the torch version the project is tested with
# (Makefile TORCH_SPEC). torch + CUDA + cuDNN are preinstalled and matched, so nothing here resolves
# a multi-GB torch wheel; the -devel variant has nvcc for building DeepSpeed's ops, the -runtime
# variant (same torch, same Python, no compiler) is the slim final stage. rayproject/ray:*-gpu was
# the alternative, but it ships no torch. Override the ARGs for another CUDA (e.g. 12.6).
#
# No secrets are baked in: the Ray token (RAY_AUTH_TOKEN), MLflow and object-store credentials come
# from the environment at run time (Kubernetes Secrets, see cluster/). No HEALTHCHECK (Ray/KubeRay
# probe the processes themselves).

ARG TORCH_VERSION=2.13.0
ARG CUDA_VERSION=12.8
ARG CUDNN_VERSION=9

# --------------------------------------------------------------------------- build stage
FROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn${CUDNN_VERSION}-devel AS builder

ARG TORCH_VERSION
# Pins duplicated from pyproject.toml so the build fails on drift (tests/test_cluster_docker.py checks
# that these equal pyproject.toml's pins; the RUN below checks what pip actually installed).
ARG RAY_VERSION=2.60.0
ARG TRANSFORMERS_VERSION=5.24.0
ARG PEFT_VERSION=0.21.2
ARG DEEPSPEED_VERSION=0.19.8
ARG MLFLOW_VERSION=3.17.2
# A100 (8.0), L4/L40S (8.9), H100/H200 (9.0): the GPUs the cluster configs request.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive

# A venv layered on the base's Python: torch comes from the base (system site-packages), everything
# else lands in /opt/venv, the only directory copied into the final stage.
RUN python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python -c "import torch, sys; v = torch.__version__.split('+')[0]; \
sys.exit(0 if v == '${TORCH_VERSION}' else f'base image has torch {v}, expected ${TORCH_VERSION}')"

# DeepSpeed's build imports torch, so no build isolation; prebuild the ops ZeRO-2 + Adam use, so the
# slim stage (no nvcc) never JIT-compiles.
RUN pip install ninja packaging \
 && DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=8 \
    pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && python -c "from deepspeed.git_version_info import installed_ops as ops; import sys; \
sys.exit(0 if ops.get('cpu_adam') and ops.get('fused_adam') else f'DeepSpeed ops not prebuilt: {ops}')"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ermgap ./ermgap
RUN pip install . \
 && pip check \
 && python -c "import sys; from importlib.metadata import version as v; \
want = {'ray': '${RAY_VERSION}', 'transformers': '${TRANSFORMERS_VERSION}', 'peft': '${PEFT_VERSION}', \
'deepspeed': '${DEEPSPEED_VERSION}', 'mlflow': '${MLFLOW_VERSION}'}; \
bad = {k: (v(k), w) for k, w in want.items() if v(k) != w}; \
sys.exit(f'installed != pinned: {bad}' if bad else 0)" \
 && ermgap --help > /dev/null

# --------------------------------------------------------------------------- final stage
FROM pytorch/pytorch:${TORCH_VERSION}-cuda${CUDA_VERSION}-cudnn${CUDNN_VERSION}-runtime

ENV DEBIAN_FRONTEND=noninteractive
# espeak-ng: synthetic corpus; wget: KubeRay's default readiness/liveness probes call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends espeak-ng wget \
 && rm -rf /var/lib/apt/lists/*

# Non-root; uid 1000 as in Ray's own images (KubeRay examples run as 1000).
RUN (useradd --create-home --uid 1000 --shell /bin/bash ray || useradd --create-home --shell /bin/bash ray)
# Owned by `ray` (like the conda env of Ray's images) so a cluster's setup_commands can add a
# provider SDK (boto3 for the AWS autoscaler) without root.
COPY --from=builder --chown=ray:ray /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0
USER ray
WORKDIR /home/ray/ermgap
# What jobs started from the image refer to (RayJob entrypoints); data/, runs/, models/ come from volumes.
COPY --chown=ray:ray configs ./configs
COPY --chown=ray:ray sweeps ./sweeps
COPY --chown=ray:ray cluster ./cluster
COPY --chown=ray:ray bench/*.py ./bench/

# CMD, not ENTRYPOINT: Ray's cluster launcher and KubeRay start containers with their own command
# (`ray start ...`), which an ENTRYPOINT would swallow.
CMD ["ermgap", "--help"]
