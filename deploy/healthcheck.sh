#!/bin/sh
# HEALTHCHECK of the vidsearch image: healthy when the process this container runs
# answers. One image runs every component, so it probes what is there, in order:
# an ingest worker's Prometheus endpoint, the gRPC port of `vidsearch serve` / `up`,
# a Ray node's raylet. One-shot commands (ingest, train, search) exit before it matters.
set -u
metrics_port="${VIDSEARCH_INGEST__METRICS_PORT:-9108}"
grpc_port="${VIDSEARCH_SERVE__GRPC_PORT:-50051}"
if wget -T 3 -q -O /dev/null "http://127.0.0.1:${metrics_port}/metrics"; then
  exit 0
fi
if python -c "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 3).close()" "$grpc_port" 2>/dev/null; then
  exit 0
fi
if wget -T 3 -q -O - http://127.0.0.1:52365/api/local_raylet_healthz 2>/dev/null | grep -q success; then
  exit 0
fi
exit 1
