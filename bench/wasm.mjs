// Times the verify decision compiled to wasm (wasm-bindgen's Node.js glue), per operation, and
// the Worker's wasm: compile, and instantiate with stand-in imports. Prints one JSON object.
// Usage: node wasm.mjs <glue.js> <worker.wasm> <iterations> <op,names,...>
import fs from "node:fs";
import { createRequire } from "node:module";

const [glue, worker, iterations, names] = process.argv.slice(2);
const n = Number(iterations);
const bench = createRequire(import.meta.url)(glue);
const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const ops = {};
names.split(",").forEach((name, op) => {
  bench.run(op, Math.min(n, 1000)); // warm up, and let V8 tier up
  const perOp = [];
  for (let r = 0; r < 5; r++) {
    const t = process.hrtime.bigint();
    bench.run(op, n);
    perOp.push(Number(process.hrtime.bigint() - t) / n);
  }
  ops[name] = median(perOp);
});

const bytes = fs.readFileSync(worker);
const compile = [];
const instantiate = [];
for (let r = 0; r < 7; r++) {
  let t = performance.now();
  const module = await WebAssembly.compile(bytes);
  compile.push(performance.now() - t);
  const imports = {};
  for (const i of WebAssembly.Module.imports(module)) {
    imports[i.module] ??= {};
    imports[i.module][i.name] =
      i.kind === "function" ? () => {} :
      i.kind === "memory" ? new WebAssembly.Memory({ initial: 17 }) :
      i.kind === "table" ? new WebAssembly.Table({ initial: 128, element: "externref" }) :
      new WebAssembly.Global({ value: "i32", mutable: true }, 0);
  }
  t = performance.now();
  await WebAssembly.instantiate(module, imports);
  instantiate.push(performance.now() - t);
}
console.log(JSON.stringify({ ops, compile_ms: median(compile), instantiate_ms: median(instantiate) }));
