// The publisher against the real broker: unroutable and invalid events
// fail, the confirm window bounds what waits, a channel the broker closes
// is replaced and the publish goes through, and the generated types are
// current.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';

import amqp from 'amqplib';

import { ConfirmWindow, InvalidEventError, UnroutableError, connect, type Publisher } from '../src/index.js';
import { AMQP_URL, BURROW_BIN, PACKAGE, eventually, unique, within } from './helpers.js';

/** An exchange and a queue bound to it with `#`, deleted afterwards. */
async function fixture(t: { after: (fn: () => Promise<void>) => void }, bind = true) {
  const exchange = unique('ts-test-ex');
  const queue = unique('ts-test-q');
  const connection = await amqp.connect(AMQP_URL);
  const channel = await connection.createChannel();
  await channel.assertExchange(exchange, 'topic', { durable: true });
  await channel.assertQueue(queue, { durable: false, exclusive: false });
  if (bind) await channel.bindQueue(queue, exchange, '#');
  const publishers: Publisher[] = [];
  const exchanges = [exchange];
  t.after(async () => {
    for (const p of publishers) await p.close();
    await channel.deleteQueue(queue);
    for (const e of exchanges) await channel.deleteExchange(e);
    await connection.close();
  });
  const open = async (options = {}) => {
    const p = await within('the publisher to connect', connect(AMQP_URL, { exchange, appId: unique('ts-test-app'), ...options }));
    publishers.push(p);
    return p;
  };
  return { exchange, exchanges, queue, channel, open };
}

const card = (id: string) => ({ aggregateId: id, userId: 'user-ada', libraryId: 'library-1', dateTimeOccurred: '2026-11-23T09:00:00Z' });

test('an event no queue is bound for is an UnroutableError, not a silent drop', async (t) => {
  const { open, exchange } = await fixture(t, false);
  const publisher = await open();
  const err = await publisher.publish(card('card-1'), { type: 'CardAddedToLibraryEvent' }).then(
    () => assert.fail('an unroutable publish resolved'),
    (e: unknown) => e,
  );
  assert.ok(err instanceof UnroutableError, String(err));
  assert.equal(err.exchange, exchange);
  assert.equal(err.retryable, false);
  assert.match(err.message, /CardAddedToLibraryEvent .* is unroutable: no queue is bound/);
});

test('events that break the contract are refused before anything is sent', async (t) => {
  const { open, queue, channel } = await fixture(t);
  const publisher = await open();
  const refused = async (event: unknown, options: Record<string, unknown>, why: RegExp) => {
    await assert.rejects(
      publisher.publish(event as never, { type: 'CardAddedToLibraryEvent', ...options }),
      (e: unknown) => e instanceof InvalidEventError && why.test(e.message),
    );
  };
  await refused({ userId: 'u' }, {}, /needs a non-empty aggregateId/);
  await refused([card('c')], {}, /must be a JSON object/);
  await refused(card('c'), { aggregateId: 'other' }, /differs from the body/);
  await refused(card('c'), { version: 0 }, /version = 0 is invalid/);
  await refused(card('c'), { type: 'x'.repeat(256) }, /at most 255/);
  await refused(card('c'), { causationId: 7 }, /causationId must be a string/);
  // options.aggregateId fills a body that lacks one.
  await publisher.publish({ userId: 'user-ada', libraryId: 'l' } as never, { type: 'CardAddedToLibraryEvent', aggregateId: 'card-9' });
  const msg = await eventually('the message', async () => (await channel.get(queue, { noAck: true })) || undefined);
  assert.equal(JSON.parse(msg.content.toString()).aggregateId, 'card-9');
  assert.equal((await channel.checkQueue(queue)).messageCount, 0, 'the refused events were not sent');
});

test('the confirm window bounds the publishes waiting for a confirm', async (t) => {
  const { open, queue, channel } = await fixture(t);
  const publisher = await open({ confirmWindow: 4 });
  const publishes = Array.from({ length: 50 }, (_, i) => publisher.publish(card(`card-${i}`), { type: 'CardAddedToLibraryEvent' }));
  assert.equal(publisher.pending, 4, 'only the window is in flight; the rest wait for a slot');
  const ids = await within('50 confirms', Promise.all(publishes));
  assert.equal(new Set(ids).size, 50);
  assert.equal(publisher.pending, 0);
  await eventually('50 messages in the queue', async () => ((await channel.checkQueue(queue)).messageCount === 50 ? true : undefined));
  assert.throws(() => new ConfirmWindow(0), /confirmWindow = 0 is invalid/);
});

test('a channel the broker closes is replaced and the publish is sent again with the same id', async (t) => {
  const { open, channel, queue, exchanges } = await fixture(t);
  // An exchange that does not exist yet: the broker closes the channel of
  // the first publish (404 NOT_FOUND), and the publisher reconnects and
  // sends again until the exchange appears.
  const late = unique('ts-test-late-ex');
  exchanges.push(late);
  const publisher = await open({ exchange: late, declareExchange: false, confirmTimeoutMs: 15_000 });
  const published = publisher.publish(card('card-late'), { type: 'CardAddedToLibraryEvent', messageId: 'late-1' });
  await eventually('a reconnect after the broker closed the channel', async () => (publisher.connections >= 2 ? true : undefined));
  await channel.assertExchange(late, 'topic', { durable: true });
  await channel.bindQueue(queue, late, '#');
  assert.equal(await within('the publish after the reconnect', published), 'late-1');
  const msg = await eventually('the message', async () => (await channel.get(queue, { noAck: true })) || undefined);
  assert.equal(msg.properties.messageId, 'late-1');
});

test('src/events.ts is what the generator makes of `burrow asyncapi`', () => {
  execFileSync(process.execPath, [join(PACKAGE, 'scripts', 'generate-types.mjs'), '--check'], {
    env: { ...process.env, BURROW_BIN },
    stdio: 'inherit',
  });
});

// Compile-time checks: tsc fails the build when an expected error is not one.
export function typeChecks(publisher: Publisher): void {
  // @ts-expect-error libraryId is required for CardAddedToLibraryEvent
  void publisher.publish({ aggregateId: 'c', userId: 'u' }, { type: 'CardAddedToLibraryEvent' });
  // @ts-expect-error userId is a string
  void publisher.publish({ aggregateId: 'c', userId: 1, libraryId: 'l' }, { type: 'CardAddedToLibraryEvent' });
  // Other event types take any JSON object.
  void publisher.publish({ aggregateId: 'b', stars: 5 }, { type: 'BookReviewedEvent' });
}
