# TEST SCAFFOLDING, not the product: a local stand-in for Flower's official images (flwr/superlink, flwr/supernode,
# flwr/superexec), built where no container registry is reachable. Like the official images it runs as the
# non-root user `app` (UID/GID 49999) from /app, with a Python venv on PATH that this user may install into.
# Built by tests/compose_demo/build_standins.sh from a debootstrapped Debian root filesystem and a host wheelhouse.
FROM localhost/fedpt-standin-base:bookworm
ARG FLWR_VERSION
LABEL org.fedpt-app.standin="test scaffolding"
RUN groupadd --gid 49999 app && useradd --uid 49999 --gid app --home-dir /app --create-home app \
 && python3 -m venv /python/venv && chown -R app:app /python
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER app
WORKDIR /app
RUN python -m pip install --no-cache-dir --no-index --find-links /wheelhouse "flwr==${FLWR_VERSION}"
