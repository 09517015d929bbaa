// Serves the built Worker and the minimal ceiling and floor Workers straight from workerd
// through Miniflare's API (no `wrangler dev` proxy in front), each with local KV holding one
// key's record. Prints `ports={...}` once all of them answer, then serves until killed.
// Usage: node edge.mjs config.json
//
// Miniflare's outbound shim is off (`stripCfConnectingIp: false`) for the Workers measured
// against each other. By default Miniflare sends every `fetch` a Worker makes through a JS
// Worker of its own that copies the request's headers to drop `CF-Connecting-IP` and then
// fetches again: a second Request, a second Headers and a service hop on every upstream call,
// which production's runtime does not have. The ceilings make no fetch, so only the gateway and
// its floor were paying it. `edge_shim` and `kv_fetch_shim` keep Miniflare's default, so the
// results still show what it costs.
//
// `edge_ledger` is our Worker with the change ledger on: the `LEDGER` Durable Object (SQLite
// storage, in memory) and `LEDGER_SIGNING_SECRET`, so hot keys are answered from the isolate's
// memory with no KV read while the ledger proves it complete. The bench driver stands in for
// origin: it appends the key's record and then a fresh watermark every 500 ms (signed appends
// to `/v1/ledger/changes`). `edge_ledger_debug` is the same with `DEBUG_HEADERS` on (its own
// ledger), to check that the hot path read no KV and to count the isolate's ledger fetches; the
// measured one runs without the headers, like the Workers it is compared with. `fetch_only` is
// the gateway's floor when memory answers: one upstream fetch, no KV.
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
  kv_fetch: {
    dir: `${config.root}/bench/workers/kv-fetch/build`,
    bindings: { RECORD_NAME: config.record_name, UPSTREAM_URL: config.upstream },
  },
  constant: { dir: `${config.root}/bench/workers/constant/build`, bindings: {} },
};
workers.edge_shim = { ...workers.edge, outboundShim: true };
workers.edge_ledger = {
  ...workers.edge,
  bindings: { ...workers.edge.bindings, LEDGER_SIGNING_SECRET: config.ledger_secret },
  ledger: true,
};
workers.edge_ledger_debug = {
  ...workers.edge_ledger,
  bindings: { ...workers.edge_ledger.bindings, DEBUG_HEADERS: "true" },
};
workers.fetch_only = {
  dir: `${config.root}/bench/workers/fetch-only/build`,
  bindings: { UPSTREAM_URL: config.upstream },
};
workers.kv_fetch_shim = { ...workers.kv_fetch, outboundShim: true };

// Cold start under workerd: a fresh Miniflare (a new workerd process) until ready, then its first
// request (a garbage key: no KV read), for our Worker and the constant Worker. Medians of 5.
const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const cold = {};
for (const name of ["edge", "constant"]) {
  const ready = [];
  const first = [];
  for (let r = 0; r < 5; r++) {
    let t = performance.now();
    const mf = new Miniflare({
      modules: modules(workers[name].dir),
      compatibilityDate: "2025-01-01",
      kvNamespaces: { KEYS: NAMESPACE },
      bindings: workers[name].bindings,
      stripCfConnectingIp: false,
    });
    await mf.ready;
    ready.push(performance.now() - t);
    t = performance.now();
    const res = await mf.dispatchFetch("http://localhost/v1/api_keys/verify", {
      method: "POST",
      body: '{"key":"garbage"}',
    });
    await res.text();
    first.push(performance.now() - t);
    await mf.dispose();
  }
  cold[name] = { ready_ms: median(ready), first_request_ms: median(first) };
}

const ports = { cold };
const running = [];
for (const [name, w] of Object.entries(workers)) {
  const mf = new Miniflare({
    modules: modules(w.dir),
    compatibilityDate: "2025-01-01",
    kvNamespaces: { KEYS: NAMESPACE },
    bindings: w.bindings,
    stripCfConnectingIp: w.outboundShim === true,
    ...(w.ledger ? { durableObjects: { LEDGER: { className: "Ledger", useSQLite: true } } } : {}),
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
