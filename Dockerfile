# CPU-only image serving the CIFAR-10 classifier (python -m cifar10_pipeline.serving.serve) on port 8000.
# Build and run commands: docs/serving.md.
#   docker build -t cifar10-serve .                          # default target: models/cifar10 baked in
#   docker build --target runtime -t cifar10-serve:bare .    # no model: mount one at /models/cifar10

FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src

# Install only what serving imports, at the exact versions pinned in pyproject.toml (read from it, so the
# pins have one home), not the training/DVC/MLflow stack. torch comes first from the CPU wheel index:
# the default wheel would pull gigabytes of CUDA libraries that a CPU server never uses.
# WITH_MLFLOW=1 adds mlflow, needed only for CIFAR10_SERVE_MODEL=models:/... registry URIs.
ARG WITH_MLFLOW=0
RUN python -c "import re, sys, tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
want = {'torch', 'transformers', 'safetensors', 'huggingface-hub', 'numpy', 'pillow', 'pydantic', \
        'pydantic-settings', 'pyyaml', 'tqdm', 'fastapi', 'uvicorn', 'python-multipart'}; \
want |= {'mlflow'} if '${WITH_MLFLOW}' == '1' else set(); \
pins = {re.split(r'[=<>!~ ;\[]', d, maxsplit=1)[0].lower(): d for d in deps}; \
missing = sorted(want - pins.keys()); \
sys.exit(f'pyproject.toml has no pin for: {missing}') if missing else None; \
print('\n'.join(pins[name] for name in sorted(want)))" > /tmp/requirements.txt \
 && grep '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
 && pip install --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt \
 && pip install -r /tmp/requirements.txt \
 && pip install --no-deps . \
 && python -c "import cifar10_pipeline.serving.serve" \
 && rm -rf /app/src /tmp/*.txt

# The commit the image was built from, reported by GET /health (there is no .git inside the image).
ARG GIT_COMMIT=unknown
RUN useradd --system --uid 10001 --create-home --home-dir /home/app app
ENV CIFAR10_SERVE_GIT_COMMIT=${GIT_COMMIT} \
    CIFAR10_SERVE_MODEL=/models/cifar10 \
    CIFAR10_SERVE_HOST=0.0.0.0 \
    CIFAR10_SERVE_PORT=8000 \
    HF_HUB_OFFLINE=1
USER app
WORKDIR /home/app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "-m", "cifar10_pipeline.serving.serve"]

# Default target: the trained model (dvc repro train) copied in, read-only for the server's user. COPY keeps
# the files' modes: save_model writes the folder world-readable (files 0644, folders 0755), which
# tests/model/test_model_folder.py checks by reading a copy as an unprivileged user. A folder saved before
# that (model.safetensors 0600) needs `chmod -R a+rX models/cifar10` or a new `dvc repro train`.
FROM runtime AS bundled
COPY models/cifar10 /models/cifar10
