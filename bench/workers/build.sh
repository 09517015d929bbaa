#!/usr/bin/env bash
# Builds the ceiling and floor Workers with the edge's profile and tools (see edge/build.sh).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
export WASM_BINDGEN_BIN=${WASM_BINDGEN_BIN:-$(command -v wasm-bindgen || echo "$HOME/.cargo/bin/wasm-bindgen")}
export ESBUILD_BIN=$ROOT/node_modules/.bin/esbuild
export WASM_OPT_BIN=$ROOT/node_modules/.bin/wasm-opt
for worker in kv-get kv-fetch fetch-only constant; do
  (cd "$worker" && worker-build --profile worker >/dev/null 2>&1) \
    || { (cd "$worker" && worker-build --profile worker); exit 1; }
done
