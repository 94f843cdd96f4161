// Runs loop.mjs ROUNDS times per queue kind, each run a process of its own,
// and prints a Markdown table of the medians [min–max], for `make bench`.

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const amqplibVersion = JSON.parse(
  readFileSync(new URL("./node_modules/amqplib/package.json", import.meta.url), "utf8"),
).version;

const rounds = Number(process.env.ROUNDS ?? 3);
const kinds = (process.env.KINDS ?? "classic,quorum").split(",").filter(Boolean);
const loop = fileURLToPath(new URL("./loop.mjs", import.meta.url));

const runs = [];
for (const kind of kinds) {
  for (let round = 1; round <= rounds; round++) {
    const out = execFileSync(process.execPath, [loop], {
      env: { ...process.env, KIND: kind, PREFIX: `bench-node-${process.pid}-${kind}-${round}` },
      encoding: "utf8",
    });
    for (const line of out.split("\n").filter((l) => l.startsWith("{"))) {
      const r = JSON.parse(line);
      process.stderr.write(`  node ${r.phase} ${kind} round ${round}: ${r.rate.toFixed(0)} msg/s, cpu ${r.cpu_per_10k.toFixed(3)} s/10k\n`);
      runs.push(r);
    }
  }
}

function cell(values, digits) {
  const v = values.filter((x) => x !== null && Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return "–";
  const mid = v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
  const f = (x) => x.toFixed(digits);
  return v.length > 1 ? `${f(mid)} [${f(v[0])}–${f(v[v.length - 1])}]` : f(mid);
}

const n = runs[0]?.n ?? 0;
console.log(`\n### Reference: Node amqplib ${amqplibVersion}, Node ${process.version} (${rounds} rounds, N=${n})\n`);
console.log("| queue | phase | msg/s | client CPU, s per 10k | broker CPU, s per 10k | peak RSS, MB |");
console.log("|---|---|---|---|---|---|");
for (const kind of kinds) {
  for (const phase of ["publish", "consume"]) {
    const rs = runs.filter((r) => r.kind === kind && r.phase === phase);
    console.log(
      `| ${kind} | ${phase} only | ${cell(rs.map((r) => r.rate), 0)} | ${cell(rs.map((r) => r.cpu_per_10k), 3)} | ${cell(rs.map((r) => r.broker_cpu_per_10k), 3)} | ${cell(rs.map((r) => r.max_rss_mb), 1)} |`,
    );
  }
}
