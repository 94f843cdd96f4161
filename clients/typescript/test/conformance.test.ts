// The publisher against the conformance suite (conformance/cases): for
// every case that says what a conforming publisher sends, publishing its
// body with its options puts exactly its properties and headers on the
// wire, and nothing else. tests/conformance.rs runs the same cases against
// burrow's consumer.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import amqp from 'amqplib';

import { connect } from '../src/index.js';
import { AMQP_URL, cases, eventually, unique, within } from './helpers.js';

/** amqplib's name of each property a case may list (`persistent` is delivery mode 2). */
const PROPERTIES = [
  'contentType',
  'contentEncoding',
  'headers',
  'deliveryMode',
  'priority',
  'correlationId',
  'replyTo',
  'expiration',
  'messageId',
  'timestamp',
  'type',
  'userId',
  'appId',
  'clusterId',
] as const;

test('the publisher sends every valid case exactly as the case says', async (t) => {
  const conforming = cases().filter((c) => c.publish);
  assert.ok(conforming.length >= 3, 'the suite has cases for a conforming publisher');
  const exchange = unique('ts-conformance-ex');
  const queue = unique('ts-conformance-q');
  const appId = unique('ts-conformance-app');
  const connection = await amqp.connect(AMQP_URL);
  const channel = await connection.createChannel();
  await channel.assertExchange(exchange, 'topic', { durable: true });
  await channel.assertQueue(queue, { durable: false });
  await channel.bindQueue(queue, exchange, '#');
  const publisher = await within('the publisher to connect', connect(AMQP_URL, { exchange, appId }));
  t.after(async () => {
    await publisher.close();
    await channel.deleteQueue(queue);
    await channel.deleteExchange(exchange);
    await connection.close();
  });

  for (const c of conforming) {
    await t.test(c.name, async () => {
      const options = c.publish!;
      const id = await publisher.publish(c.body as never, options);
      const msg = await eventually(`${c.name} in ${queue}`, async () => (await channel.get(queue, { noAck: true })) || undefined);
      assert.equal(msg.fields.routingKey, c.routingKey);
      assert.deepEqual(JSON.parse(msg.content.toString('utf8')), c.body, 'the body is the event, as JSON');
      assert.equal(id, msg.properties.messageId);

      const expected: Record<string, unknown> = {};
      for (const [key, value] of Object.entries(c.properties)) {
        if (key === 'persistent') expected.deliveryMode = value ? 2 : undefined;
        else expected[key] = value === '$appId' ? appId : value;
      }
      const sent: Record<string, unknown> = {};
      for (const key of PROPERTIES) {
        const value = (msg.properties as unknown as Record<string, unknown>)[key];
        // amqplib reports an absent headers table as {} or undefined alike.
        if (value !== undefined && !(key === 'headers' && Object.keys(value as object).length === 0)) sent[key] = value;
      }
      if (expected.headers && Object.keys(expected.headers as object).length === 0) delete expected.headers;
      assert.deepEqual(sent, expected, `the properties on the wire are the case's, no more and no fewer (${c.description})`);
    });
  }
});
