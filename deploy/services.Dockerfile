# syntax=docker/dockerfile:1
# The Python services image: API, scheduler, and the Ray head and worker nodes that run the
# student workers (Ray Jobs run `python -m student_worker.run`). Built FROM the Ray image so that
# its containers can join a Ray cluster (KubeRay or `ray start`); Ray's version must match the
# `ray` requirement in pyproject.toml (a test checks it).
#
#   CPU:  docker build -f deploy/services.Dockerfile -t distillery-services:cpu .
#   CUDA: docker build -f deploy/services.Dockerfile -t distillery-services:gpu \
#           --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# SERVICES_EXTRAS names the package extras the workers need (default peft, for LoRA students; add
# mlflow and wandb for those trackers: --build-arg SERVICES_EXTRAS=peft,mlflow,wandb).
# BuildKit sends only what services.Dockerfile.dockerignore lets through.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${RAY_IMAGE}

# Installed as the README says: torch first (the variant comes from the index), then the package,
# whose own `torch` range keeps the build already there. Non-editable: the image has no work tree.
ARG TORCH_REQUIREMENT=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SERVICES_EXTRAS=peft

# Mount points (/runs is written by every node; a named volume copies this ownership) and the
# build directory, made by root and handed to the Ray user.
USER 0
RUN mkdir -p /models /data /runs /tmp/distillery-src && chown 1000:100 /runs /tmp/distillery-src
# The Ray image's own non-root user `ray` (uid 1000, group users = 100), numeric so that
# Kubernetes' runAsNonRoot can verify it; Ray's Python lives in its home.
USER 1000:100
WORKDIR /home/ray
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# DL3013 (unpinned pip): the pin is in TORCH_REQUIREMENT, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_REQUIREMENT}"

# The sources are only built from; afterwards the installed package is the one Python imports.
WORKDIR /tmp/distillery-src
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 teacher_server ./teacher_server
COPY --chown=1000:100 student_worker ./student_worker
COPY --chown=1000:100 services ./services
# DL3013: the extras' versions are pinned in pyproject.toml, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${SERVICES_EXTRAS:+[$SERVICES_EXTRAS]}" && rm -rf /tmp/distillery-src
WORKDIR /home/ray

COPY --chown=1000:100 deploy/healthcheck.py /home/ray/healthcheck.py

# API 8000; Ray: GCS 6379, dashboard and Jobs API 8265, client 10001, dashboard agent 52365.
EXPOSE 8000 6379 8265 10001 52365

# The default command is the API, so the image's health check is the API's readiness (Redis and
# Ray reachable). docker-compose.yml gives the Ray nodes and the scheduler checks of their own.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/home/ray/healthcheck.py", "http://127.0.0.1:8000/readyz"]

CMD ["distillery", "api", "--host", "0.0.0.0", "--port", "8000"]
