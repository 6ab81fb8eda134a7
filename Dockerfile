# One image for every role: front, scheduler, http, serve (pick one with the
# command). BASE_IMAGE: any Debian-based image with python3 and a `python3 -m
# venv` that works; where Docker Hub cannot be reached, make one locally
# (docs/deployment.md, "Building the image without Docker Hub").
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# Compilers only here, in case a dependency has no wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY workers /src/workers
COPY deploy/image/install.sh /install.sh
RUN /install.sh /opt/venv /src

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="stui-sessions" \
      org.opencontainers.image.description="Session service for STUI, the Smalltalk terminal IDE"
RUN groupadd --system --gid 10001 stui \
    && useradd --system --uid 10001 --gid stui --no-create-home --shell /usr/sbin/nologin stui \
    && mkdir -p /var/lib/stui /tmp/metrics /tmp/stui-health \
    && chown stui:stui /var/lib/stui /tmp/metrics /tmp/stui-health
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STUI_DATA_DIR=/var/lib/stui \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics \
    STUI_HEALTH_DIR=/tmp/stui-health
USER 10001:10001
WORKDIR /var/lib/stui
EXPOSE 5555 9102
# Exec form, so that SIGTERM reaches Python and the drain runs.
ENTRYPOINT ["stui-sessions"]
CMD ["front", "--bind", "tcp://0.0.0.0:5555"]
# Every role leaves in STUI_HEALTH_DIR how to probe it: a front its bound
# endpoint (pinged through the real protocol), the http role its /healthz, the
# scheduler a heartbeat (workers/health.py). Stopping: a front drains within
# STUI_SHUTDOWN_GRACE (5 s; at worst 1.5 x that + 2 s with several workers),
# inside `docker stop`'s 10 s.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["stui-sessions", "healthcheck"]
