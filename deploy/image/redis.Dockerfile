# A stand-in for the redis:7 image where Docker Hub cannot be reached: Debian's
# redis-server on the same local base as the service's image. The compose
# stack takes it with STUI_REDIS_IMAGE (docs/deployment.md).
#   docker build -f deploy/image/redis.Dockerfile --build-arg BASE_IMAGE=local/python:3.11-slim -t local/redis:7 deploy/image
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data
COPY redis-entrypoint.sh /usr/local/bin/redis-entrypoint
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["redis-entrypoint"]
CMD ["redis-server"]
