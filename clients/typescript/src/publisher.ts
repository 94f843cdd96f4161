import { randomUUID } from 'node:crypto';
import amqp from 'amqplib';
import type { ChannelModel, ConfirmChannel, Message, Options } from 'amqplib';

import {
  ClosedError,
  ConfirmTimeoutError,
  InvalidEventError,
  NackedError,
  UnroutableError,
} from './errors.js';
import type { EventType, EventTypes } from './events.js';
import { ConfirmWindow } from './window.js';

/** How {@link connect} sets the publisher up. Every field has a default. */
export interface ConnectOptions {
  /** The AMQP `app_id` of every message: the publishing service's name. Default `typescript-publisher`. */
  appId?: string;
  /** The topic exchange (burrow's `amqp.exchange`). Default `domain_events`. */
  exchange?: string;
  /** At most this many publishes wait for their confirm at once; more wait for a slot. Default 256. */
  confirmWindow?: number;
  /** How long one publish may take, reconnects included, before {@link ConfirmTimeoutError}. Default 10000. */
  confirmTimeoutMs?: number;
  /** Declare the exchange (durable topic, burrow's flags) on every connect. Default true. */
  declareExchange?: boolean;
}

/** What one publish says besides the body (docs/wire-contract.md §2). */
export interface PublishOptions<K extends string = string> {
  /** The event type: the routing key and the AMQP `type`. */
  type: K;
  /** The aggregate; written into the body as `aggregateId` when the body lacks it. */
  aggregateId?: string;
  /** The message id (de-duplication key); a UUID v4 when unset. Pass the same id when publishing an event again. */
  messageId?: string;
  /** Ties together everything one request caused; the message id when unset. */
  correlationId?: string;
  /** The message or command that caused this event (`burrow-causation-id`). */
  causationId?: string;
  /** Schema version of the body (`burrow-event-version`), sent when it is not 1. */
  version?: number;
  /** When the event occurred (the AMQP `timestamp`, seconds); else the body's `dateTimeOccurred`, else now. */
  occurredAt?: Date;
}

/** A reference event type's body, or any JSON object for other types. */
export type EventBody<K extends string> = K extends EventType ? EventTypes[K] : Record<string, unknown>;

/** One connection and its confirm channel; replaced when either closes. */
interface Link {
  connection: ChannelModel;
  channel: ConfirmChannel;
  /** Message ids the broker returned as unroutable, until their confirm comes. */
  returned: Set<string>;
  closed: boolean;
}

type Attempt = { kind: 'ok' } | { kind: 'nacked' } | { kind: 'returned' } | { kind: 'lost'; error: Error };

/** AMQP limits a routing key to a short string. */
const MAX_ROUTING_KEY_BYTES = 255;

/**
 * Connects to the broker at `url` and returns a publisher with burrow's
 * guarantees: every publish is mandatory and persistent and resolves only
 * once RabbitMQ confirmed it.
 *
 * ```ts
 * const publisher = await connect(process.env.AMQP_URL!, { appId: 'library-api' });
 * await publisher.publish(
 *   { aggregateId: 'card-1', userId: 'user-ada', libraryId: 'library-1', dateTimeOccurred: new Date().toISOString() },
 *   { type: 'CardAddedToLibraryEvent', correlationId: requestId },
 * );
 * ```
 */
export async function connect(url: string, options: ConnectOptions = {}): Promise<Publisher> {
  const publisher = new Publisher(url, options);
  // The first connection is made now, so a wrong URL fails here and not at the first publish.
  await publisher.ready();
  return publisher;
}

/**
 * Publishes domain events to a burrow exchange over a confirm channel.
 * A lost connection or channel is replaced on the next publish; a publish
 * whose confirm was lost with it is sent again, with the same message id,
 * until `confirmTimeoutMs` has passed (so a consumer may see it twice: burrow
 * de-duplicates on the message id).
 */
export class Publisher {
  readonly appId: string;
  readonly exchange: string;
  readonly confirmTimeoutMs: number;
  private readonly declareExchange: boolean;
  private readonly window: ConfirmWindow;
  private current?: Promise<Link>;
  private closed = false;
  /** Connections opened so far: 1 after connect(), more after reconnects. */
  connections = 0;

  constructor(
    private readonly url: string,
    options: ConnectOptions = {},
  ) {
    this.appId = options.appId ?? 'typescript-publisher';
    this.exchange = options.exchange ?? 'domain_events';
    this.confirmTimeoutMs = options.confirmTimeoutMs ?? 10_000;
    this.declareExchange = options.declareExchange ?? true;
    this.window = new ConfirmWindow(options.confirmWindow ?? 256);
  }

  /** Resolves once a connection and confirm channel are open. */
  async ready(): Promise<void> {
    await this.link();
  }

  /** Publishes waiting for their confirm right now (at most `confirmWindow`). */
  get pending(): number {
    return this.window.pending;
  }

  /**
   * Publishes `event` as `options.type` and resolves with its message id once
   * RabbitMQ has stored it. Rejects with {@link UnroutableError} when no queue
   * is bound for the type, {@link NackedError}, {@link ConfirmTimeoutError}
   * or {@link InvalidEventError}: never silently.
   */
  async publish<K extends string>(event: EventBody<K>, options: PublishOptions<K>): Promise<string> {
    const type = options.type;
    const messageId = options.messageId ?? randomUUID();
    if (this.closed) throw new ClosedError(type, messageId);
    const { body, properties } = this.message(event as Record<string, unknown>, options, messageId);

    await this.window.acquire();
    try {
      return await this.send(type, messageId, body, properties);
    } finally {
      this.window.release();
    }
  }

  /** Closes the channel and the connection; publishes still waiting fail. */
  async close(): Promise<void> {
    this.closed = true;
    const current = this.current;
    this.current = undefined;
    const link = await current?.catch(() => undefined);
    if (link && !link.closed) {
      link.closed = true;
      await link.channel.close().catch(() => undefined);
      await link.connection.close().catch(() => undefined);
    }
  }

  /** The body and properties of one message, checked against the contract. */
  private message(
    event: Record<string, unknown>,
    options: PublishOptions,
    messageId: string,
  ): { body: Buffer; properties: Options.Publish } {
    const type = options.type;
    const invalid = (why: string) => new InvalidEventError(type, messageId, why);
    if (typeof type !== 'string' || type.length === 0) throw invalid('options.type must name the event type');
    if (Buffer.byteLength(type) > MAX_ROUTING_KEY_BYTES) {
      throw invalid(`the event type is ${Buffer.byteLength(type)} bytes; a routing key holds at most ${MAX_ROUTING_KEY_BYTES}`);
    }
    if (event === null || typeof event !== 'object' || Array.isArray(event)) {
      throw invalid('the event must be a JSON object (burrow decodes the body into an object)');
    }
    let fields = event;
    if (options.aggregateId !== undefined) {
      if (fields.aggregateId === undefined) fields = { ...fields, aggregateId: options.aggregateId };
      else if (fields.aggregateId !== options.aggregateId) {
        throw invalid(`options.aggregateId ${JSON.stringify(options.aggregateId)} differs from the body's ${JSON.stringify(fields.aggregateId)}`);
      }
    }
    if (typeof fields.aggregateId !== 'string' || fields.aggregateId.length === 0) {
      throw invalid('the body needs a non-empty aggregateId (or pass options.aggregateId)');
    }
    const version = options.version ?? 1;
    if (!Number.isInteger(version) || version < 1) {
      throw invalid(`version = ${version} is invalid: the schema version is a whole number from 1`);
    }
    // What apps with [ordering] shard on, as burrow's own publisher sends it.
    const headers: Record<string, string | number> = { 'burrow-aggregate-id': fields.aggregateId };
    // A message without the header is version 1, as burrow's own publisher sends it.
    if (version !== 1) headers['burrow-event-version'] = version;
    if (options.causationId !== undefined) {
      if (typeof options.causationId !== 'string') throw invalid('causationId must be a string (burrow dead-letters any other type)');
      headers['burrow-causation-id'] = options.causationId;
    }
    return {
      body: Buffer.from(JSON.stringify(fields)),
      properties: {
        persistent: true,
        mandatory: true,
        messageId,
        correlationId: options.correlationId ?? messageId,
        type,
        // AMQP timestamps are seconds; Date.now() would put milliseconds there.
        timestamp: Math.floor(occurredAt(options, fields).getTime() / 1000),
        contentType: 'application/json',
        appId: this.appId,
        headers,
      },
    };
  }

  /** Sends until confirmed, returned, nacked or out of time. */
  private async send(type: string, messageId: string, body: Buffer, properties: Options.Publish): Promise<string> {
    const deadline = Date.now() + this.confirmTimeoutMs;
    let lastError: Error | undefined;
    for (let attempt = 0; ; attempt += 1) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new ConfirmTimeoutError(type, messageId, this.confirmTimeoutMs, lastError);
      if (this.closed) throw new ClosedError(type, messageId);
      let outcome: Attempt | 'timeout';
      try {
        const link = await within(this.link(), remaining);
        outcome = link === 'timeout' ? 'timeout' : await within(sendOnce(link, this.exchange, type, body, properties), deadline - Date.now());
      } catch (error) {
        outcome = { kind: 'lost', error: error as Error };
      }
      if (outcome === 'timeout') continue;
      switch (outcome.kind) {
        case 'ok':
          return messageId;
        case 'returned':
          throw new UnroutableError(type, messageId, this.exchange);
        case 'nacked':
          throw new NackedError(type, messageId);
        case 'lost':
          // The connection or channel went away before the confirm: the
          // broker may or may not have the message, so send it again, with
          // the same id, on a fresh channel.
          lastError = outcome.error;
          await pause(Math.min(50 * 2 ** attempt, 1_000, Math.max(0, deadline - Date.now())));
      }
    }
  }

  /** The open link, or a new one when there is none. */
  private link(): Promise<Link> {
    if (!this.current) {
      const opening = this.open();
      this.current = opening;
      // A failed attempt is forgotten, so the next call tries again.
      opening.catch(() => {
        if (this.current === opening) this.current = undefined;
      });
    }
    return this.current;
  }

  private async open(): Promise<Link> {
    const connection = await amqp.connect(this.url, { clientProperties: { connection_name: `${this.appId} (@burrow/publisher)` } });
    const link: Link = { connection, channel: undefined as unknown as ConfirmChannel, returned: new Set(), closed: false };
    const lost = () => {
      link.closed = true;
      if (this.current && !this.closed) {
        void this.current.then((l) => {
          if (l === link) this.current = undefined;
        }, () => undefined);
      }
    };
    // Without an 'error' listener a broker-side close would crash the process.
    connection.on('error', lost);
    connection.on('close', lost);
    try {
      link.channel = await connection.createConfirmChannel();
      link.channel.on('error', lost);
      link.channel.on('close', () => {
        lost();
        // A channel closed by the broker (e.g. PRECONDITION_FAILED) leaves the connection: close it too.
        connection.close().catch(() => undefined);
      });
      // RabbitMQ sends basic.return before the basic.ack of an unroutable mandatory message.
      link.channel.on('return', (msg: Message) => link.returned.add(String(msg.properties.messageId)));
      if (this.declareExchange) {
        await link.channel.assertExchange(this.exchange, 'topic', { durable: true, autoDelete: false, internal: false });
      }
    } catch (error) {
      await connection.close().catch(() => undefined);
      throw error;
    }
    this.connections += 1;
    return link;
  }
}

function sendOnce(link: Link, exchange: string, type: string, body: Buffer, properties: Options.Publish): Promise<Attempt> {
  return new Promise((resolve) => {
    const messageId = String(properties.messageId);
    try {
      link.channel.publish(exchange, type, body, properties, (err: Error | null | undefined) => {
        const returned = link.returned.delete(messageId);
        if (!err) resolve(returned ? { kind: 'returned' } : { kind: 'ok' });
        // amqplib's words for a basic.nack; anything else is a lost channel.
        else if (err.message === 'message nacked') resolve({ kind: 'nacked' });
        else resolve({ kind: 'lost', error: err });
      });
    } catch (error) {
      // amqplib throws when the channel is already closed.
      resolve({ kind: 'lost', error: error as Error });
    }
  });
}

function occurredAt(options: PublishOptions, fields: Record<string, unknown>): Date {
  if (options.occurredAt) return options.occurredAt;
  const stated = fields.dateTimeOccurred;
  if (typeof stated === 'string') {
    const parsed = new Date(stated);
    if (!Number.isNaN(parsed.getTime())) return parsed;
  }
  return new Date();
}

/** `promise`, or 'timeout' after `ms`; the timer never holds the process open. */
async function within<T>(promise: Promise<T>, ms: number): Promise<T | 'timeout'> {
  if (ms <= 0) return 'timeout';
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => {
    timer = setTimeout(() => resolve('timeout'), ms);
    timer.unref();
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref());
}
