# spotlora trainer image: QLoRA fine-tuning on NVIDIA T4 (sm_75) and newer.
#
# Production (CUDA, from a registry):
#   docker build -t spotlora:0.1.0 .
# CI (no registry, CPU torch from a local wheel; docker/build-image.sh does this):
#   docker build --build-arg BASE_IMAGE=spotlora-base:bookworm-<hash> \
#     --build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_INDEX_URL= -t spotlora:ci .
#
# CUDA and drivers. torch's CUDA wheels bring their own CUDA runtime, cuBLAS and
# cuDNN (the nvidia-* wheels), so the base needs no CUDA; only the driver comes
# from the node. cu126 is chosen because CUDA 12.x runs on any driver >= 525
# (minor-version compatibility) and its wheels are built for Turing (sm_75):
#   GKE  gpu-driver-version=DEFAULT (terraform/gcp)  R535  -> CUDA 12.x only
#   GKE  gpu-driver-version=LATEST                   R580  -> CUDA 12.x or 13.x
#   EKS  AL2023_x86_64_NVIDIA AMI, g4dn (T4)          R580  -> CUDA 12.x or 13.x
# CUDA 13.x (cu130) needs driver >= 580, so it would fail on GKE's default
# driver. To change: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# and NVIDIA_REQUIRE_CUDA="cuda>=13.0" once every node pool runs R580+ (and
# before PyTorch stops publishing cu126 wheels, announced for 2.15).
#
# PID 1. ENTRYPOINT is exec form, so the trainer itself is PID 1 and receives
# the kubelet's SIGTERM directly; it installs SIGTERM/SIGINT handlers that
# checkpoint and exit 75. No tini: dataloader workers are 0 and the only child
# processes are short-lived ones Python's subprocess module waits for, so there
# are no orphans to reap (tests/container checks the process list), and a signal
# forwarder would add nothing to a process that handles its own signals.
# Kubernetes has no --init anyway; with `docker run` you may still add --init.
# Multi-GPU (`spotlora launch`, the eks-t4-multi* overlays): PID 1 is then
# torchrun's agent, which forwards SIGTERM to its workers and waits for them.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS deps

# CUDA 12.6 wheels by default; empty TORCH_INDEX_URL = PyPI / docker/wheels only.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG PYPI_INDEX_URL=https://pypi.org/simple

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PIP_INDEX_URL=${PYPI_INDEX_URL} \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_CONSTRAINT=/src/docker/constraints.txt

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

RUN python3.11 -m venv /opt/venv

# torch first: the biggest layer, and it changes only with TORCH_*. From
# PyTorch's own index alone, as PyTorch documents it (no mixing of indexes for
# torch and its nvidia-* wheels); wheels in docker/wheels/ (git-ignored; CI puts
# torch's CPU wheel there) are found first.
COPY docker/wheels/ /wheels/
RUN if [[ -n "${TORCH_INDEX_URL}" ]]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
    && PIP_CONSTRAINT='' /opt/venv/bin/pip install --find-links /wheels "${TORCH_SPEC}" \
    && rm -rf /wheels
COPY docker/constraints.txt docker/constraints.txt

# The pinned dependencies from pyproject.toml and its `tracking` extra (spec.tracking's
# TensorBoard, MLflow and W&B clients: ~150 MB beside torch's GBs), without the source,
# so editing service/ does not reinstall them.
COPY pyproject.toml README* ./
RUN python3.11 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["tracking"]))' \
        | grep -v '^torch' > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

# The package alone, under /pkg, so the runtime stage adds it as a layer of a few
# hundred KB on top of the unchanged multi-GB venv layer: a code change pushes
# and pulls kilobytes, not the CUDA libraries again.
FROM deps AS build
COPY service/ service/
COPY entrypoint.py ./
RUN /opt/venv/bin/pip install --no-deps --no-compile --no-warn-script-location --root /pkg . \
    && /opt/venv/bin/python -m compileall -q -s /pkg /pkg/opt/venv/lib \
    && cp -a /pkg/. / \
    && /opt/venv/bin/spotlora --help > /dev/null

# The venv without pip: nothing installs packages at run time.
FROM deps AS venv
RUN /opt/venv/bin/pip uninstall --yes pip

# ------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

ARG NVIDIA_REQUIRE_CUDA="cuda>=12.0"

# uid/gid 10001 as the pod's securityContext expects; a passwd entry so
# getpass/pwd lookups (torch, triton caches) work; home is the /tmp mount.
RUN groupadd --system --gid 10001 spotlora \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin spotlora \
    && mkdir -p /var/cache/spotlora /opt/spotlora \
    && chown 10001:10001 /var/cache/spotlora

COPY --from=venv /opt/venv /opt/venv
COPY --from=build /pkg/ /
COPY --from=build /src/entrypoint.py /opt/spotlora/entrypoint.py
# Writes the cpu-quickstart overlay's tiny model and data (its init container).
COPY examples/samples.py /opt/spotlora/samples.py

# The root filesystem is read-only in the pod; only /tmp and the cache are
# mounted writable. /usr/local/nvidia is where GKE's device plugin mounts the
# driver's user-space libraries and nvidia-smi (the NVIDIA container toolkit on
# EKS puts them on the default paths instead).
ENV PATH=/opt/venv/bin:/usr/local/nvidia/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/local/nvidia/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA=${NVIDIA_REQUIRE_CUDA} \
    HOME=/tmp \
    TMPDIR=/tmp \
    SPOTLORA_CACHE_DIR=/var/cache/spotlora \
    HF_HOME=/var/cache/spotlora/huggingface \
    HF_HUB_OFFLINE=0 \
    TRANSFORMERS_OFFLINE=0 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8

USER 10001:10001
WORKDIR /opt/spotlora
EXPOSE 9090

ENTRYPOINT ["spotlora"]
CMD ["--help"]

# Last, so a new revision or build time changes only the image config, not a layer.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=https://github.com/spotlora/spotlora
ARG BASE_IMAGE
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126

LABEL org.opencontainers.image.title="spotlora" \
      org.opencontainers.image.description="QLoRA fine-tuning as a preemption-safe batch job for spot NVIDIA T4 GPUs" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      dev.spotlora.torch="${TORCH_SPEC} ${TORCH_INDEX_URL}"
