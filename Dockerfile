# syntax=docker/dockerfile:1
# The RaptorFlow Data server image: `docker build -t raptorflow-data .` (or `make docker`).
#
# The build stage installs ./stubs and . (no dev extras) into a virtualenv at
# /opt/venv; the runtime stage copies only that venv onto the same base image,
# so the interpreter path inside the venv stays valid and no build tooling ships.

ARG PYTHON_IMAGE=python:3.11-slim

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
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["raptorflow-data", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["raptorflow-data"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
