# charrnn: the trainer and the HTTP service, CPU build of PyTorch by default.
#   docker build -t charrnn .                                   # CPU (see README "Docker" for its size)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t charrnn:cuda .
# Two build arguments, nothing else: PYTHON_IMAGE (a Python 3.11 image on Debian bookworm) and
# TORCH_INDEX_URL (a pip index holding the torch build, searched beside PyPI).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and the project, nothing else ----------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# The compiler for the C kernel below (before the sources are copied, so that a code change keeps this layer).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
# torch first, pinned as in the Makefile. TORCH_INDEX_URL is an extra index beside PyPI, so torch's own
# dependencies come from PyPI; its `2.13.0+cpu` is a higher version than PyPI's (CUDA) `2.13.0`, so pip
# takes the index's build. Then what neither `import torch` nor the service uses: C++ headers, CMake
# files, torch's own test suite and test libraries, and the C++ test programs in torch/bin (all but
# torch_shm_manager, which `import torch` looks for).
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
 && torch_dir="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch" \
 && test -x "$torch_dir/bin/torch_shm_manager" \
 && find "$torch_dir/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
 && rm -rf "$torch_dir/include" "$torch_dir/share/cmake" "$torch_dir/test" \
           "$torch_dir"/lib/libjitbackend_test.so "$torch_dir"/lib/libtorchbind_test.so \
           "$torch_dir"/lib/libbackend_with_compiler.so "$torch_dir"/lib/libaoti_custom_ops.so \
 && python -c "import torch; torch.ones(1)"
# The sources live only in this stage: the runtime image gets the installed package, /opt/venv.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY charrnn ./charrnn
COPY model ./model
COPY service ./service
COPY corpora ./corpora
# The package without its optional extras (the `plot` extra, matplotlib, draws loss.png; without it
# `charrnn train` logs that it skips the plot). Then the engine's C kernel (service/engine/lstm_kernel.py),
# compiled here, where a compiler is, for the runtime image, which has none: the runtime finds it in
# CHARRNN_KERNEL_DIR by a hash of its source and flags. Every build is made (bfloat16 for AVX512-BF16,
# AVX2/FMA/F16C, portable C), so a runtime CPU unlike this one finds its own. `python -P` keeps /src off sys.path, so this
# compiles (and checks for the default model in) the installed package, the one the runtime image gets.
RUN pip install . \
 && CC=gcc CHARRNN_KERNEL_DIR=/opt/kernels python -P -c "from charrnn.service.engine import lstm_kernel; lstm_kernel.build_all(); assert lstm_kernel.load()" \
 && python -P -c "from charrnn.service.config import DEFAULT_MODEL_DIR as d; assert '/opt/venv/' in str(d) and any(d.glob('*.safetensors')), d"

# ---- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="charrnn" \
      org.opencontainers.image.description="Character-level RNN text generation service"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CHARRNN_HOST=0.0.0.0 \
    CHARRNN_PORT=8000 \
    CHARRNN_CACHE_DIR=/tmp/charrnn-cache \
    CHARRNN_KERNEL_DIR=/opt/kernels \
    HOME=/tmp
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /models /data \
 && chown 10001:10001 /models /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/kernels /opt/kernels
# The code, its Gunicorn config (the module charrnn.service.web.gunicorn_conf) and the default model (service/default_model,
# the default CHARRNN_MODEL_DIR) are all in the installed package in /opt/venv. The working directory holds
# nothing and belongs to root: Gunicorn puts it first on sys.path, so no Python may ever be found there.
WORKDIR /app
# Models to serve: mount a directory of checkpoints here and set CHARRNN_MODEL_DIR=/models.
# (Owned by the app user, so a named volume mounted there is writable by `charrnn train`.)
VOLUME ["/models", "/data"]
USER 10001:10001
EXPOSE 8000
# Liveness: /health/live answers at once, generating nothing, busy or not; it fails when the engine has
# jobs but no step succeeded for CHARRNN_HEALTH_TIMEOUT seconds. (/health is the readiness check.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('CHARRNN_PORT', '8000'), timeout=4)"]
# Gunicorn with the project's config module (gthread workers, models loaded in each worker after fork).
# Gunicorn itself, not `charrnn serve`: serve would check the flags, change to a directory without foreign
# code and exec this same command, but here WORKDIR is empty already, and this is the very command the
# end-to-end tests run (GUNICORN_COMMAND, tests/helpers.py), so the image runs what is tested.
# `docker stop` must wait longer than CHARRNN_GRACEFUL_TIMEOUT (30 s) for streams to finish: -t 40.
CMD ["gunicorn", "-c", "python:charrnn.service.web.gunicorn_conf", "charrnn.service.web.app:create_app()"]
