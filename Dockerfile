# syntax=docker/dockerfile:1
#
# Distillery: one image for the API, the workers and `distillery migrate`.
# The command picks the role (see docker-compose.yml):
#   docker run IMAGE                                  -> distillery api
#   docker run IMAGE worker --queues cpu              -> a Celery worker
#   docker run IMAGE migrate                          -> upgrade the database schema
#
# Build args:
#   TORCH_INDEX_URL  extra pip index for torch. Default: PyTorch's CPU wheels (small image).
#                    Set it empty (--build-arg TORCH_INDEX_URL=) for PyPI's default torch build,
#                    which bundles CUDA (a GPU worker image; several GB).
# torch's version is never named here: it comes from the `engine` extra in pyproject.toml.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# Builder: a self-contained virtual environment with the project's dependencies.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"

WORKDIR /src

# Only the project metadata: this layer (torch and the rest, the slow part) is rebuilt only
# when pyproject.toml changes, not on every source edit. Installing '.[engine]' from the bare
# metadata installs every dependency plus the `distillery` console script; the packages
# themselves are copied as source into the final stage (found there through PYTHONPATH).
# README.md* : the glob keeps the build working whether or not the file exists.
COPY pyproject.toml README.md* ./
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --upgrade pip setuptools wheel \
    && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} '.[engine]'

# ---------------------------------------------------------------------------------------------
# Runtime: the venv, the source, a non-root user; no compilers, no pip cache.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="distillery" \
      org.opencontainers.image.description="Model compression as a service: API, workers and migrations."

# libgomp1: OpenMP runtime used by the numeric wheels (torch CPU, onnxruntime).
# bubblewrap and libseccomp2: layers of the job sandbox (docs/security.md). Under Docker's default seccomp
# profile an unprivileged container cannot create user namespaces, so bubblewrap's layer is found missing at
# start-up and Landlock + seccomp (which need no privilege) confine the job processes; the worker says which.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 bubblewrap libseccomp2 \
    && rm -rf /var/lib/apt/lists/*

# Non-root user with a fixed uid, so volume ownership is stable across rebuilds and hosts.
RUN groupadd --system --gid 10001 distillery \
    && useradd --system --uid 10001 --gid distillery --create-home --home-dir /home/distillery \
       --shell /usr/sbin/nologin distillery

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# The source the image runs: app/ (API + CLI), worker/ (engine), migrations/ + alembic.ini
# (app.core.migrate finds migrations/ next to app/; `alembic upgrade head` works from /app).
COPY app/ ./app/
COPY worker/ ./worker/
COPY migrations/ ./migrations/
COPY alembic.ini ./
# Byte-compile now: at run time /app is read-only to the non-root user.
RUN python -m compileall -q app worker migrations \
    && echo /app > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/distillery-app.pth"
# (the .pth file: job processes run `python -I`, which ignores PYTHONPATH, and still find app/ and worker/)

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DISTILLERY_DATA_DIR=/data

# Data (artifacts, uploads; the SQLite file and broker folders of the embedded mode) lives in
# /data, owned by the runtime user. A named volume mounted there starts with this ownership.
RUN mkdir -p /data && chown distillery:distillery /data
VOLUME /data

USER distillery

EXPOSE 8000

# Liveness: `distillery healthcheck` reads the container's main process and probes the API's /healthz on the
# port it was given (`api --port N`); a worker or migration container, which serves no HTTP, passes (a worker that
# stops ends its container). docker-compose.yml also disables it for those.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["distillery", "healthcheck"]

ENTRYPOINT ["distillery"]
CMD ["api"]
