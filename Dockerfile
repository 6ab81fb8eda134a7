# syntax=docker/dockerfile:1
# One image for every role: front, scheduler, http (pick one with the command).

FROM python:3.11-slim AS build
# Compilers only here, in case a dependency has no wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY service /src/service
COPY workers /src/workers
COPY deploy/image/install.sh /install.sh
RUN /install.sh /opt/venv /src

FROM python:3.11-slim
LABEL org.opencontainers.image.title="stui-sessions" \
      org.opencontainers.image.description="Session service for STUI, the Smalltalk terminal IDE"
RUN groupadd --system --gid 10001 stui \
    && useradd --system --uid 10001 --gid stui --no-create-home --shell /usr/sbin/nologin stui \
    && mkdir -p /var/lib/stui /tmp/metrics \
    && chown stui:stui /var/lib/stui /tmp/metrics
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STUI_DATA_DIR=/var/lib/stui \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
USER 10001:10001
WORKDIR /var/lib/stui
EXPOSE 5555 9102
# Exec form, so that SIGTERM reaches Python and the drain runs.
ENTRYPOINT ["stui-sessions"]
CMD ["front", "--bind", "tcp://0.0.0.0:5555"]
# A ZeroMQ ping through the real protocol; the http role has /healthz instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["stui-sessions", "call", "ping", "--timeout", "2", "--retries", "0"]
