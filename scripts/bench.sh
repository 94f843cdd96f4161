#!/usr/bin/env bash
# `make bench`: the end-to-end benchmark against the broker (burrow vs
# hand-written lapin loops, see benches/e2e/main.rs), then the criterion
# micro-benchmarks of the consumer's hot path (benches/pipeline.rs).
#
# Environment (all optional; see benches/e2e/main.rs for the full list):
#   AMQP_URL   broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   N          events per run (default 100000; N=20000 for a quick run)
#   ROUNDS     rounds of alternation between the sides (default 3)
#   SIDES      burrow,batched,baseline (default: all three, in that order)
#   KINDS      queue kinds (default classic,quorum)
#   SCENARIOS  pipeline,split,latency,idle,failure (default: all of them), and
#              workers (WORKERS=1,2,4 processes draining one queue together)
#   SOAK_N     events of the optional soak (default 0: off; e.g. 1000000)
#   SKIP_E2E=1 / SKIP_MICRO=1   run only one of the two parts
#   NODE_REF=0 skip the Node amqplib reference row (benches/node)
#
# The report goes to stdout and to target/bench_e2e/report-<time>.md; the
# raw per-run figures to target/bench_e2e/results.json. The benchmark makes
# no timing assertions: it reports.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
CARGO="${CARGO:-cargo}"
LOCKED=()
[[ -f Cargo.lock ]] && LOCKED=(--locked)

out_dir=target/bench_e2e
mkdir -p "$out_dir"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
report="$out_dir/report-$stamp.md"

if [[ "${SKIP_E2E:-0}" != 1 ]]; then
  echo "==> end-to-end: N=${N:-100000} ROUNDS=${ROUNDS:-3} KINDS=${KINDS:-classic,quorum}" >&2
  "$CARGO" build "${LOCKED[@]}" --release --bench e2e
  # The binary runs each measured side as a child process of its own.
  "$CARGO" bench "${LOCKED[@]}" --quiet --bench e2e | tee "$report"
  echo "report: $report" >&2
fi

# The reference row: the same workload with Node's amqplib (benches/node),
# installed here from its lock file. NODE_REF=0 skips it.
if [[ "${SKIP_E2E:-0}" != 1 && "${NODE_REF:-1}" != 0 ]]; then
  if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    echo "==> reference: Node amqplib" >&2
    npm ci --prefix benches/node --no-audit --no-fund --loglevel=error >&2
    port="$(sed -E 's#^[a-z]+://([^@/]*@)?[^:/]*:?([0-9]*).*#\2#' <<<"$AMQP_URL")"
    BROKER_PID="$(ss -ltnpH "sport = :${port:-5672}" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)"
    export BROKER_PID
    node benches/node/report.mjs | tee -a "$report"
  else
    echo "==> reference: Node amqplib skipped (node and npm not installed)" >&2
  fi
fi

if [[ "${SKIP_MICRO:-0}" != 1 ]]; then
  echo "==> micro-benchmarks: cargo bench --bench pipeline" >&2
  "$CARGO" bench "${LOCKED[@]}" --bench pipeline
fi
