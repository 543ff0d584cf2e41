# CPU image of tinyllm: the trained model and pretrained GPT-2 behind the HTTP API on port 5000.
#
#   docker build -t tiny-llm .
#   docker run -p 5000:5000 tiny-llm
#   curl -X POST http://localhost:5000/generate/custom -H 'Content-Type: application/json' \
#        -d '{"prompt": "The future of AI is"}'
#
# Two stages: the builder makes a virtual environment, fetches the assets (GPT-2 BPE ranks, built-in
# corpus) and trains the default model for TRAIN_MINUTES (or takes the checkpoint dropped into
# docker/checkpoint/); the final image gets only the venv, the model (weights and its own tokenizer), the
# assets, the app and a C compiler (for the decode step, see C_COMPILER), and runs as a non-root user.
#
# Build arguments:
#   BASE_IMAGE           python:3.11-slim (any Debian-like image with python3 >= 3.10 and venv)
#   PIP_INDEX_URL        https://pypi.org/simple
#   PIP_EXTRA_INDEX_URL  https://download.pytorch.org/whl/cpu  (torch==X resolves to X+cpu: no CUDA, and
#                        the build fails if a CUDA torch or any nvidia-* package slips in anyway)
#   PIP_FIND_LINKS       empty; a directory of local wheels (with a build volume, e.g. podman build -v)
#   TRAIN_MINUTES        2: wall-clock budget of the training done during the build
#   TRAIN_ARGS           extra `tinyllm train` options, e.g. "--preset seed"
#   C_COMPILER           gcc: the C compiler kept in the image for the C decode step; empty for none (-202 MB)
# Empty PIP_* arguments are left unset. A pretrained GPT-2 is not baked in: /generate/gpt2 loads it from
# the Hugging Face hub at start-up (TINYLLM_GPT2, set it to "off" to disable) and answers 503 without it.
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- builder
FROM ${BASE_IMAGE} AS builder

ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS=

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TINYLLM_HOME=/opt/tinyllm \
    PYTHONUNBUFFERED=1

WORKDIR /src

# Dependencies first: this layer (torch included) is reused until requirements.txt changes.
COPY requirements.txt ./
COPY docker/pip-env.sh docker/check-cpu-torch.py /usr/local/lib/tinyllm-build/
# The torch wheel carries C++ headers, test binaries and protoc (~190 MB) that serving never touches.
RUN python3 -m venv "$VIRTUAL_ENV" \
 && . /usr/local/lib/tinyllm-build/pip-env.sh \
 && pip install -r requirements.txt \
 && torch=$(python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])') \
 && rm -rf "$torch/include" "$torch/test" "$torch"/bin/*Test "$torch"/bin/test_* "$torch"/bin/protoc* \
 && python /usr/local/lib/tinyllm-build/check-cpu-torch.py

COPY pyproject.toml README.md app.py train.py ./
COPY src ./src
RUN . /usr/local/lib/tinyllm-build/pip-env.sh \
 && pip install --no-deps . \
 && tinyllm fetch-assets

# The model: docker/checkpoint/ when it holds a checkpoint (or a run directory with best/ or last/),
# else a fresh one trained here. Only the weights, config and metadata go on to /opt/model/best.
ARG TRAIN_MINUTES=2
ARG TRAIN_ARGS=
COPY docker/checkpoint/ /src/docker/checkpoint/
COPY docker/build-checkpoint.sh /usr/local/lib/tinyllm-build/
RUN sh /usr/local/lib/tinyllm-build/build-checkpoint.sh /src/docker/checkpoint /opt/model

# ------------------------------------------------------------------------------------------------ final
FROM ${BASE_IMAGE}

# A C compiler for the batch-1 decode step (+202 MB): the server builds the step for the CPU it runs on at
# start-up (~1 s, tinyllm.fused_decode) and a lone request decodes with it: 1,706 vs 354 tokens/s eagerly for
# the default model, measured in this image (BENCHMARKS.md, Docker). --build-arg C_COMPILER= leaves it out.
ARG C_COMPILER=gcc
RUN if [ -n "${C_COMPILER}" ]; then \
        apt-get update \
     && apt-get install -y --no-install-recommends ${C_COMPILER} libc6-dev \
     && rm -rf /var/lib/apt/lists/* /var/cache/apt/*; \
    fi

ARG APP_UID=10001
RUN useradd --create-home --uid "${APP_UID}" --user-group --shell /usr/sbin/nologin app \
 && mkdir -p /app /opt/tinyllm \
 && chown app:app /app /opt/tinyllm

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TINYLLM_HOME=/opt/tinyllm \
    TINYLLM_HOST=0.0.0.0 \
    TINYLLM_PORT=5000 \
    TINYLLM_CHECKPOINT=/app/runs/default

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=app:app /opt/tinyllm/assets /opt/tinyllm/assets
COPY --from=builder --chown=app:app /opt/model /app/runs/default
COPY --chown=app:app app.py train.py /app/

WORKDIR /app
USER app
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('TINYLLM_PORT', '5000'), timeout=4)"
CMD ["python", "app.py"]
