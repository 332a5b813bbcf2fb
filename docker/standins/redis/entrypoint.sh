#!/bin/sh
# Like the official image: `redis-server ...` listens on every interface without protected
# mode (the official build turns it off; the network is the container's own).
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = "redis-server" ]; then set -- "$@" --protected-mode no; fi
exec "$@"
