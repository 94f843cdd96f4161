/**
 * Why a publish failed. Each error names the event type, the message id and
 * what to do; `retryable` says whether publishing again (with the same
 * `messageId`) can succeed.
 */
export class PublishError extends Error {
  constructor(
    message: string,
    readonly eventType: string,
    readonly messageId: string,
    readonly retryable: boolean,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

/**
 * The broker returned the event: no queue is bound for its type on the
 * exchange (RabbitMQ sends `basic.return` for a mandatory message before it
 * acks it). Nothing was stored. Start a burrow worker that subscribes to the
 * type, or run `burrow topology apply`, then publish again.
 */
export class UnroutableError extends PublishError {
  constructor(eventType: string, messageId: string, readonly exchange: string) {
    super(
      `${eventType} (message ${messageId}) is unroutable: no queue is bound for it on exchange ` +
        `"${exchange}"; start a worker that subscribes to ${eventType} or run \`burrow topology apply\`, then publish again`,
      eventType,
      messageId,
      false,
    );
  }
}

/** The broker nacked the event: it is not stored. Publish again with the same `messageId`. */
export class NackedError extends PublishError {
  constructor(eventType: string, messageId: string) {
    super(
      `${eventType} (message ${messageId}) was nacked by the broker and is not stored; publish it again with the same messageId`,
      eventType,
      messageId,
      true,
    );
  }
}

/**
 * No confirm arrived within `confirmTimeoutMs`, across reconnects: the event
 * may or may not be stored. Publish again with the same `messageId`, so that
 * consumers can recognise a duplicate.
 */
export class ConfirmTimeoutError extends PublishError {
  constructor(
    eventType: string,
    messageId: string,
    readonly timeoutMs: number,
    readonly lastError?: Error,
  ) {
    super(
      `${eventType} (message ${messageId}) was not confirmed within ${timeoutMs} ms` +
        (lastError ? ` (last error: ${lastError.message})` : '') +
        '; it may or may not be stored: publish it again with the same messageId',
      eventType,
      messageId,
      true,
    );
  }
}

/** The event or its options break the wire contract; nothing was sent. */
export class InvalidEventError extends PublishError {
  constructor(eventType: string, messageId: string, why: string) {
    super(`${eventType || '(no type)'} is not published: ${why}`, eventType, messageId, false);
  }
}

/** `publish` after `close()`. */
export class ClosedError extends PublishError {
  constructor(eventType: string, messageId: string) {
    super(`${eventType} (message ${messageId}) is not published: the publisher is closed; connect() a new one`, eventType, messageId, false);
  }
}
