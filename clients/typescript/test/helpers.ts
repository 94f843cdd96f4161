// Shared by the tests: the broker, unique names, bounded waits, the
// conformance cases and the burrow binary.
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The package root (tests run from dist/test). */
export const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
/** The repository root. */
export const REPO = resolve(PACKAGE, '..', '..');
/** The broker every test uses. */
export const AMQP_URL = process.env.AMQP_URL ?? 'amqp://guest:guest@127.0.0.1:5672';
/** The burrow binary built from this repository. */
export const BURROW_BIN = process.env.BURROW_BIN ?? join(REPO, 'target', 'debug', 'burrow');
/** Upper bound of every wait. */
export const WAIT_MS = 20_000;

/** `<prefix>-<uuid>`: every test names its exchanges, queues and apps like this. */
export function unique(prefix: string): string {
  return `${prefix}-${randomUUID().replace(/-/g, '')}`;
}

/** `promise`, or a failure naming `what` after `ms`. */
export async function within<T>(what: string, promise: Promise<T>, ms = WAIT_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Polls `probe` every 20 ms until it returns a value other than undefined,
 * for at most `ms`; the failure names `what` and the last state seen.
 */
export async function eventually<T>(what: string, probe: () => Promise<T | undefined>, ms = WAIT_MS): Promise<T> {
  const deadline = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const value = await probe();
      if (value !== undefined) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() >= deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last error: ${String(last)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** One file of conformance/cases. */
export interface Case {
  name: string;
  description: string;
  routingKey: string;
  body?: unknown;
  bodyText?: string;
  properties: Record<string, unknown>;
  /** Present when a conforming publisher must produce `properties` from these options. */
  publish?: { type: string; messageId?: string; correlationId?: string; causationId?: string; version?: number };
  expect: { outcome: 'handled' | 'dead_lettered' | 'ignored'; handlers?: string[]; reason?: string };
}

/** Every conformance case, sorted by name. */
export function cases(): Case[] {
  const dir = join(REPO, 'conformance', 'cases');
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => ({ name: f.replace(/\.json$/, ''), ...JSON.parse(readFileSync(join(dir, f), 'utf8')) }) as Case);
}
