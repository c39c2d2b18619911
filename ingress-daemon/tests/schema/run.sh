#!/usr/bin/env bash
# Runs schemathesis against a fresh ingressd's /openapi.json: no 5xx, every response matches
# the schema, invalid requests and missing auth are rejected.
# Usage: ingress-daemon/tests/schema/run.sh [path/to/ingressd]   (needs `pip install schemathesis`)
set -euo pipefail
bin=${1:-target/debug/ingressd}
command -v schemathesis >/dev/null || { echo "schemathesis not installed (pip install schemathesis)" >&2; exit 1; }
data=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
INGRESSD_DATA_DIR=$data INGRESSD_API_LISTEN=127.0.0.1:$port INGRESSD_API_TOKEN=schema-token \
  INGRESSD_LISTEN_ADDR=127.0.0.1 RUST_LOG=warn "$bin" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 $pid || { echo "ingressd exited" >&2; exit 1; }
  sleep 0.1
done
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  -H "Authorization: Bearer schema-token" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection,ignored_auth \
  --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-50}"
