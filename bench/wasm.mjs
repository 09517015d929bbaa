// Times the verify decision compiled to wasm (wasm-bindgen's Node.js glue), per operation.
// Prints one JSON object. Usage: node wasm.mjs <glue.js> <iterations> <op,names,...>
// (The Worker's own wasm uses wasm features Node 20 lacks, such as exnref: its start-up is
// measured under workerd instead, by edge.mjs.)
import { createRequire } from "node:module";

const [glue, iterations, names] = process.argv.slice(2);
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

console.log(JSON.stringify({ ops }));
