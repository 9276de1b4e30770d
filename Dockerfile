# syntax=docker/dockerfile:1
# The RaptorFlow Data server image: `docker build -t raptorflow-data .` (or `make docker`).
#
# The build stage installs ./stubs and . (no dev extras) into a virtualenv at
# /opt/venv; the runtime stage copies only that venv onto the same base image,
# so the interpreter path inside the venv stays valid and no build tooling ships.
# Only the build reaches PyPI: the running image needs no network but the database.
# tests/test_dockerfile.py checks this file (no Docker engine runs in CI).

# A full version tag, so a rebuild gets the same Python and Debian release. Pin a
# digest as well (python:3.11.14-slim-bookworm@sha256:...) once you have read it
# from your registry; tests/test_dockerfile.py accepts either.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
# .dockerignore keeps this to the two distributions' sources.
COPY . .
# Both in one command, so the server's `raptorflow-data-stubs` requirement is
# met by ./stubs rather than looked up on PyPI.
RUN /opt/venv/bin/pip install ./stubs .

FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --system --user-group --uid 10001 --no-create-home --shell /usr/sbin/nologin raptorflow
COPY --from=build /opt/venv /opt/venv
# Settings come from the environment (flags would win over it), so a Kubernetes
# ConfigMap or `docker run -e` can change any of them, the listen address included.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAPTORFLOW_LISTEN=0.0.0.0:50051
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051
# Liveness ("" service) on the plaintext gRPC port. With TLS on that port, probe
# the plaintext health-only port (RAPTORFLOW_HEALTH_LISTEN) instead.
HEALTHCHECK --interval=10s --timeout=5s --start-period=40s --retries=3 \
    CMD ["raptorflow-data", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]
ENTRYPOINT ["raptorflow-data"]
CMD ["serve"]
