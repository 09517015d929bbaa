// Serves the built Worker and the two ceiling Workers straight from workerd through Miniflare's
// API (no `wrangler dev` proxy in front), each with local KV holding one key's record. Prints
// `ports={...}` once all three answer, then serves until killed. Usage: node edge.mjs config.json
import fs from "node:fs";
import { Miniflare } from "miniflare";

const config = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const NAMESPACE = "00000000000000000000000000000000";

function modules(dir) {
  return [
    { type: "ESModule", path: "index.js", contents: fs.readFileSync(`${dir}/index.js`, "utf8") },
    { type: "CompiledWasm", path: "index_bg.wasm", contents: fs.readFileSync(`${dir}/index_bg.wasm`) },
  ];
}

// The edge's own [vars] from wrangler.toml's defaults, with the upstream pointed at the ceiling
// server and no usage reports (origin is not running in this step).
const ROUTES = "GET /orders/** read:orders\nPOST /orders write:orders\nGET /status\n";
const workers = {
  edge: {
    dir: `${config.root}/edge/build`,
    bindings: {
      ROUTES,
      UPSTREAM_URL: config.upstream,
      UPSTREAM_SIGNING_SECRET: "bench-upstream-secret-000000000000",
      DEBUG_HEADERS: "false",
    },
  },
  kv_get: {
    dir: `${config.root}/bench/workers/kv-get/build`,
    bindings: { RECORD_NAME: config.record_name },
  },
  constant: { dir: `${config.root}/bench/workers/constant/build`, bindings: {} },
};

const ports = {};
const running = [];
for (const [name, w] of Object.entries(workers)) {
  const mf = new Miniflare({
    modules: modules(w.dir),
    compatibilityDate: "2025-01-01",
    kvNamespaces: { KEYS: NAMESPACE },
    bindings: w.bindings,
    host: "127.0.0.1",
    port: 0,
  });
  const url = await mf.ready;
  const kv = await mf.getKVNamespace("KEYS");
  await kv.put(config.record_name, config.record_json);
  ports[name] = Number(url.port);
  running.push(mf);
}
console.log(`ports=${JSON.stringify(ports)}`);
const stop = async () => {
  await Promise.all(running.map((mf) => mf.dispose()));
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
setInterval(() => {}, 1 << 30);
