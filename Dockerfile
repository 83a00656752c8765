# syntax=docker/dockerfile:1
# charrnn: the trainer and the HTTP service, CPU build of PyTorch by default.
#   docker build -t charrnn .                                   # CPU (about 0.85 GB, see README)
#   docker build --build-arg TORCH_INDEX=cu128 -t charrnn:cuda .   # opt in to a CUDA build of torch
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and the project, nothing else ----------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, from PyTorch's own index for the chosen build, so the project's own `torch>=` range is
# already satisfied and pip never swaps in a CUDA build by accident.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && rm -rf /opt/venv/lib/python3.11/site-packages/torch/include \
           /opt/venv/lib/python3.11/site-packages/torch/test \
           /opt/venv/lib/python3.11/site-packages/torch/bin
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY corpora ./corpora
RUN pip install .
# The engine's C kernel (service/native_lstm.py) compiled here, where a compiler is, for the runtime
# image, which has none: the runtime finds it in CHARRNN_KERNEL_DIR by a hash of its source and flags.
# Both variants are built (AVX2/FMA/F16C and portable C), so a runtime CPU without AVX2 finds its own.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && CC=gcc CHARRNN_KERNEL_DIR=/opt/kernels python -c "from service import native_lstm; native_lstm.build_all(); assert native_lstm.load()"

# ---- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="charrnn" \
      org.opencontainers.image.description="Character-level RNN text generation service"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHARRNN_HOST=0.0.0.0 \
    CHARRNN_PORT=8000 \
    CHARRNN_MODEL_DIR=/app/service/default_model \
    CHARRNN_CACHE_DIR=/tmp/charrnn-cache \
    CHARRNN_KERNEL_DIR=/opt/kernels \
    HOME=/tmp
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models /data \
 && chown 10001:10001 /models /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kernels /opt/kernels
WORKDIR /app
# The same files the package was built from: gunicorn reads its config from service/gunicorn.conf.py,
# and the default model lives in service/default_model (models mount over CHARRNN_MODEL_DIR instead).
COPY --chown=root:root service ./service
COPY --chown=root:root model ./model
COPY --chown=root:root corpora ./corpora
# Models to serve: mount a directory of checkpoints here and set CHARRNN_MODEL_DIR=/models.
# (Owned by the app user, so a named volume mounted there is writable by `charrnn train`.)
VOLUME ["/models", "/data"]
USER 10001:10001
EXPOSE 8000
# /health waits up to CHARRNN_HEALTH_TIMEOUT (10 s) for its one-character generation: allow more.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHARRNN_PORT', '8000'), timeout=12)"]
# Gunicorn with the project's config (gthread workers, models loaded in each worker after fork).
CMD ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]
