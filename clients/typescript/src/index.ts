/**
 * @burrow/publisher: publish domain events to burrow apps on RabbitMQ with
 * the wire contract's guarantees (docs/wire-contract.md): confirmed,
 * mandatory, persistent, with `message_id`, `timestamp`, `type`,
 * `content_type`, `app_id`, correlation and causation set.
 */
export { connect, Publisher, type ConnectOptions, type PublishOptions, type EventBody } from './publisher.js';
export { PublishError, UnroutableError, NackedError, ConfirmTimeoutError, InvalidEventError, ClosedError } from './errors.js';
export { ConfirmWindow } from './window.js';
export * from './events.js';
