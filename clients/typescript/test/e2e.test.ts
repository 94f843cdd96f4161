// End to end: a burrow worker (the binary built from this repository, on an
// app and exchange of its own) handles what this package publishes, for
// every reference event type. The bodies are the conformance suite's valid
// cases; the worker's /metrics says which handler ran how often.
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, mkdtempSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import amqp from 'amqplib';

import { EVENT_TYPES, connect } from '../src/index.js';
import { AMQP_URL, BURROW_BIN, REPO, cases, eventually, unique, within } from './helpers.js';

/** A port nothing listens on right now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  assert.ok(address && typeof address === 'object');
  return address.port;
}

/** `handler → ok runs` from a Prometheus exposition. */
function okRuns(metrics: string): Map<string, number> {
  const runs = new Map<string, number>();
  for (const line of metrics.split('\n')) {
    if (!line.startsWith('burrow_handler_runs_total{') || !line.includes('outcome="ok"')) continue;
    const handler = /handler="([^"]+)"/.exec(line)?.[1];
    const value = Number(line.slice(line.lastIndexOf(' ') + 1));
    if (handler) runs.set(handler, (runs.get(handler) ?? 0) + value);
  }
  return runs;
}

test('a burrow worker handles what the package publishes, for every reference event type', async (t) => {
  const app = unique('ts-e2e');
  const exchange = unique('ts-e2e-ex');
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const log = join(mkdtempSync(join(tmpdir(), 'burrow-ts-e2e-')), 'worker.log');
  const env: NodeJS.ProcessEnv = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('BURROW') && k !== 'APP_ENV' && k !== 'RUST_LOG'),
  );
  Object.assign(env, {
    BURROW_CONFIG_DIR: join(REPO, 'config'),
    BURROW__AMQP__URL: AMQP_URL,
    BURROW__APP__NAME: app,
    BURROW__AMQP__EXCHANGE: exchange,
    BURROW__HTTP__ADDR: `127.0.0.1:${port}`,
    BURROW__RETRY__DELAYS: '1s',
  });
  const out = createWriteStream(log);
  const worker: ChildProcess = spawn(BURROW_BIN, ['run'], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  worker.stdout?.pipe(out);
  worker.stderr?.pipe(out);
  const exited = new Promise<number | null>((resolve) => worker.once('exit', (code) => resolve(code)));

  const admin = await amqp.connect(AMQP_URL);
  const channel = await admin.createChannel();
  const queue = `events_${app}`;
  t.after(async () => {
    if (worker.exitCode === null) {
      worker.kill('SIGTERM');
      await within('the worker to drain and exit', exited).catch(() => worker.kill('SIGKILL'));
    }
    for (const q of [queue, `${queue}.retry.1.1s`, `${queue}.dead`]) await channel.deleteQueue(q).catch(() => undefined);
    await channel.deleteExchange(exchange).catch(() => undefined);
    await admin.close().catch(() => undefined);
  });

  await eventually(`the worker to be ready (log: ${log})`, async () => {
    if (worker.exitCode !== null) throw new Error(`burrow run exited with ${worker.exitCode}: ${readFileSync(log, 'utf8')}`);
    const res = await fetch(`${base}/readyz`).catch(() => undefined);
    return res?.status === 200 ? true : undefined;
  });

  const valid = cases().filter((c) => c.publish && c.expect.outcome === 'handled');
  for (const type of EVENT_TYPES) {
    assert.ok(valid.some((c) => c.routingKey === type), `conformance/cases has no valid case for ${type}`);
  }
  const publisher = await within('the publisher to connect', connect(AMQP_URL, { exchange, appId: 'ts-e2e-publisher' }));
  const expected = new Map<string, number>();
  try {
    for (const c of valid) {
      await publisher.publish(c.body as never, c.publish!);
      for (const h of c.expect.handlers ?? []) expected.set(h, (expected.get(h) ?? 0) + 1);
    }
  } finally {
    await publisher.close();
  }

  const runs = await eventually(`every handler to run (log: ${log})`, async () => {
    const metrics = await (await fetch(`${base}/metrics`)).text();
    const seen = okRuns(metrics);
    return [...expected].every(([h, n]) => seen.get(h) === n) ? seen : undefined;
  });
  assert.deepEqual(Object.fromEntries(runs), Object.fromEntries(expected));
  const metrics = await (await fetch(`${base}/metrics`)).text();
  assert.doesNotMatch(metrics, /^burrow_dead_letters_total\{[^}]*\} [1-9]/m, 'nothing was dead-lettered');
  assert.equal((await channel.checkQueue(`${queue}.dead`)).messageCount, 0);

  worker.kill('SIGTERM');
  assert.equal(await within('the worker to drain and exit', exited), 0, `burrow run exit code (log: ${log})`);
});
