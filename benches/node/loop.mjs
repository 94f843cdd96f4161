// The reference row of `make bench`: the same workload as benches/e2e with
// Node's amqplib, the client the TypeScript publishers use.
//
// One process, one classic or quorum queue of its own (names from PREFIX):
// publish N events with confirms (at most WINDOW outstanding), then drain
// them with basic.qos(PREFETCH), parsing each body and acking it
// (amqplib's ack is sent without waiting, so this is its fastest plain
// consumer). Prints one JSON line per phase: rate, client CPU per 10k
// messages, peak RSS, and the broker's CPU per 10k when BROKER_PID is set.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f N=50000 node loop.mjs

import { readFileSync } from "node:fs";
import amqp from "amqplib";

const url = process.env.AMQP_URL ?? "amqp://guest:guest@127.0.0.1:5672/%2f";
const n = Number(process.env.N ?? 50000);
const window = Number(process.env.WINDOW ?? 1000);
const prefetch = Number(process.env.PREFETCH ?? 200);
const kind = process.env.KIND ?? "classic";
const prefix = process.env.PREFIX ?? `bench-node-${process.pid}`;
const brokerPid = process.env.BROKER_PID;
const eventType = "CardAddedToLibraryEvent";

const ticks = 100; // USER_HZ on Linux
function brokerCpu() {
  if (!brokerPid) return null;
  try {
    const fields = readFileSync(`/proc/${brokerPid}/stat`, "utf8")
      .split(") ")[1]
      .split(" ");
    return (Number(fields[11]) + Number(fields[12])) / ticks;
  } catch {
    return null;
  }
}

function probe() {
  const cpu = process.cpuUsage();
  return {
    at: process.hrtime.bigint(),
    cpu: (cpu.user + cpu.system) / 1e6,
    broker: brokerCpu(),
  };
}

function report(phase, start, end) {
  const secs = Number(end.at - start.at) / 1e9;
  const per10k = (s) => (s / n) * 10000;
  console.log(
    JSON.stringify({
      client: "amqplib",
      phase,
      kind,
      n,
      rate: n / secs,
      cpu_per_10k: per10k(end.cpu - start.cpu),
      broker_cpu_per_10k:
        start.broker === null || end.broker === null
          ? null
          : per10k(end.broker - start.broker),
      max_rss_mb: process.resourceUsage().maxRSS / 1024,
    }),
  );
}

function event(seq) {
  return {
    aggregateId: `card-${String(seq).padStart(12, "0")}-7f3a9c2e4b1d`,
    userId: `user-${String(seq % 100000).padStart(6, "0")}`,
    libraryId: `library-${String(seq % 1000).padStart(4, "0")}`,
    dateTimeOccurred: new Date().toISOString(),
    seq,
    sentAtNs: 0,
  };
}

const exchange = `${prefix}.ex`;
const queue = `${prefix}.q`;
const conn = await amqp.connect(url);
const setup = await conn.createChannel();
await setup.assertExchange(exchange, "topic", { durable: true });
await setup.assertQueue(queue, {
  durable: true,
  arguments: { "x-queue-type": kind },
});
await setup.bindQueue(queue, exchange, eventType);

try {
  // Publish: confirm channel, at most `window` unconfirmed, honouring the
  // socket's backpressure.
  const pub = await conn.createConfirmChannel();
  let outstanding = 0;
  let failed = 0;
  let wake = null;
  const start = probe();
  for (let seq = 0; seq < n; seq++) {
    while (outstanding >= window) {
      await new Promise((resolve) => (wake = resolve));
    }
    outstanding++;
    const ok = pub.publish(
      exchange,
      eventType,
      Buffer.from(JSON.stringify(event(seq))),
      {
        persistent: true,
        mandatory: true,
        messageId: `${prefix}-${seq}`,
        type: eventType,
        contentType: "application/json",
        timestamp: Math.floor(Date.now() / 1000),
      },
      (err) => {
        outstanding--;
        if (err) failed++;
        if (wake) {
          const w = wake;
          wake = null;
          w();
        }
      },
    );
    if (!ok) await new Promise((resolve) => pub.once("drain", resolve));
  }
  await pub.waitForConfirms();
  report("publish", start, probe());
  if (failed > 0) throw new Error(`${failed} publishes were nacked`);
  await pub.close();

  // Consume: parse, handle (count), ack.
  const sub = await conn.createChannel();
  await sub.prefetch(prefetch);
  let handled = 0;
  const consumeStart = probe();
  await new Promise((resolve) => {
    sub.consume(queue, (msg) => {
      JSON.parse(msg.content.toString());
      handled++;
      sub.ack(msg);
      if (handled === n) resolve();
    });
  });
  report("consume", consumeStart, probe());
  await sub.close();
} finally {
  await setup.deleteQueue(queue);
  await setup.deleteExchange(exchange);
  await conn.close();
}
