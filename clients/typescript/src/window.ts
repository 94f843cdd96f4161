/**
 * A counting semaphore: at most `size` publishes wait for their confirm at
 * once. RabbitMQ confirms asynchronously; without a bound, a burst of
 * publishes would hold every body in memory until the broker catches up.
 */
export class ConfirmWindow {
  private inFlight = 0;
  private readonly waiting: Array<() => void> = [];

  constructor(readonly size: number) {
    if (!Number.isInteger(size) || size < 1) {
      throw new RangeError(`confirmWindow = ${size} is invalid: use a whole number of 1 or more (default 256)`);
    }
  }

  /** Resolves once a slot is free; call `release()` when the confirm came. */
  async acquire(): Promise<void> {
    if (this.inFlight < this.size) {
      this.inFlight += 1;
      return;
    }
    // The slot is handed over by release(), so inFlight stays counted.
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }

  release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.inFlight -= 1;
  }

  /** Publishes waiting for their confirm now. */
  get pending(): number {
    return this.inFlight;
  }
}
