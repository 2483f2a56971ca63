#!/usr/bin/env bash
# Builds llama.cpp's own server, `llama-server` (continuous batching over parallel slots), for the
# side-by-side runs of compare_vllm.sh (`LLAMACPP=1`). llama.cpp publishes no source package on
# the registries this machine reaches, so the sources come from llama-cpp-python's sdist on PyPI,
# which vendors them. Built for this CPU (GGML_NATIVE), without curl or OpenSSL (models are local
# files here). About 10 minutes on 2 cores.
#
# Usage: benchmarks/setup_llamacpp.sh
# Env:   PEERS    where to put it, as in compare_vllm.sh (default: peers/ beside this checkout);
#                 the server lands in $PEERS/llamacpp/llama-server
#        VERSION  the llama-cpp-python sdist to take the sources from (default 0.3.36)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-$(cd "$ROOT/.." && pwd)/peers}
VERSION=${VERSION:-0.3.36}
DEST=$PEERS/llamacpp
SRC=$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp

mkdir -p "$DEST/src"
if [ ! -d "$SRC" ]; then
  "$ROOT/.venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$DEST/src"
  tar -xzf "$DEST/src/llama_cpp_python-$VERSION.tar.gz" -C "$DEST/src"
fi
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
cmake --build "$DEST/build" --target llama-server -j "$(nproc)"
ln -sf build/bin/llama-server "$DEST/llama-server"
"$DEST/llama-server" --version 2>&1 | tail -2
