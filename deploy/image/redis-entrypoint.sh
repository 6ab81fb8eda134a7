#!/bin/sh
# As the redis:7 image does: a server started without a config file listens
# on every address of the container, so turn protected mode off (the
# container's network is the boundary; compose publishes no Redis port).
set -e
if [ "${1:-}" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
