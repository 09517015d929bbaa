#!/usr/bin/env bash
# Builds the Worker into edge/build/ (wrangler.toml's [build] command runs this).
# worker-build would download wasm-bindgen, wasm-opt and esbuild from GitHub; point it at the
# pinned local ones instead (./dev setup installs them: wasm-bindgen-cli with cargo, the rest
# from the root package.json).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd .. && pwd)
export WASM_BINDGEN_BIN=${WASM_BINDGEN_BIN:-$(command -v wasm-bindgen || echo "$HOME/.cargo/bin/wasm-bindgen")}
export ESBUILD_BIN=$ROOT/node_modules/.bin/esbuild
export WASM_OPT_BIN=$ROOT/node_modules/.bin/wasm-opt
# wrangler runs this on every `wrangler dev` start: skip the ~7 s of wasm-opt when nothing the
# Worker is built from changed since the last build.
out=build/index_bg.wasm
if [ -f "$out" ] && [ -f build/index.js ] && [ -z "${FORCE_BUILD:-}" ] \
   && [ -z "$(find src ../shared/src Cargo.toml ../shared/Cargo.toml ../Cargo.toml ../Cargo.lock build.sh -newer "$out" -print -quit)" ]; then
  echo "edge: build is up to date ($out)" >&2
  exit 0
fi
worker-build --profile worker "$@"
touch "$out"
