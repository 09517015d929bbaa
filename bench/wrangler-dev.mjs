// Serves one Worker the way `wrangler dev` does (wrangler's own dev server: its proxy Worker in
// front, the same Miniflare, local KV, the Worker's wrangler.toml), but with DevTools off, which
// the `wrangler dev` command cannot do. Prints `Ready on <url>`, then serves until killed.
// Usage: node wrangler-dev.mjs CONFIG PORT PERSIST_DIR [NAME:VALUE]...
//
// Why: `wrangler dev` always attaches its inspector and enables the DevTools Network domain, so
// for every `fetch` a Worker makes, the runtime emits four network events and wrangler's
// inspector proxy forwards each to wrangler's Node process as an HTTP request. Workers that
// fetch (the gateway and its floor) pay for that; the ceilings, which do not, do not. This
// runner shows the same Workers without it.
import { unstable_startWorker } from "wrangler";

const [config, port, persist, ...vars] = process.argv.slice(2);
const bindings = {};
for (const pair of vars) {
  const at = pair.indexOf(":");
  bindings[pair.slice(0, at)] = { type: "plain_text", value: pair.slice(at + 1) };
}
const worker = await unstable_startWorker({
  config,
  bindings,
  dev: {
    server: { hostname: "127.0.0.1", port: Number(port) },
    inspector: false,
    persist,
    watch: false,
  },
});
await worker.ready;
console.log(`Ready on ${(await worker.url).href}`);
const stop = async () => {
  await worker.dispose();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
setInterval(() => {}, 1 << 30);
