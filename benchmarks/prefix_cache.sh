#!/usr/bin/env bash
# TTFT with and without prefix caching on a workload whose prompts share a 1,000-token prefix
# (a long system prompt): 16 requests one at a time, each 1,000 shared + 64 own tokens, 16 out.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${PORT:-8300}
for flag in --enable-prefix-caching --no-enable-prefix-caching; do
  .venv/bin/pagedserve serve --port "$PORT" "$flag" --disable-access-log > /tmp/prefix_cache_server.log 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; do sleep 1; done
  echo "== pagedserve serve $flag"
  .venv/bin/pagedserve bench serve --base-url "http://127.0.0.1:$PORT" --num-prompts 16 \
    --prefix-len 1000 --input-len 64 --output-len 16 --ignore-eos --max-concurrency 1 \
    --disable-tqdm | grep -E "TTFT|throughput"
  kill -INT "$pid"
  wait "$pid" || true
done
