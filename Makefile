# Developer entry points for burrow. `make help` lists the targets.
CARGO ?= cargo
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/%2f
export AMQP_URL
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
export DATABASE_URL

# Lock dependencies to Cargo.lock whenever it exists.
LOCKED := $(if $(wildcard Cargo.lock),--locked,)

.PHONY: help broker demo test lint containers-lint run fuzz

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

broker: ## make sure a RabbitMQ broker answers on AMQP_URL
	bash scripts/ensure-broker.sh

.PHONY: postgres
postgres: ## make sure PostgreSQL answers on DATABASE_URL and its database exists
	bash scripts/ensure-postgres.sh

demo: broker ## run the end-to-end demo against the broker
	$(CARGO) run --quiet --release -- demo

.PHONY: browser
browser: ## make sure headless Chromium and chromedriver are installed (the console's browser test)
	bash scripts/install-browser.sh

test: broker postgres browser ## run every test target with every feature (postgres included), the doc tests, the TypeScript publisher's tests and the AsyncAPI check
	$(CARGO) test $(LOCKED) --all-features --all-targets
	$(CARGO) test $(LOCKED) --all-features --doc
	$(MAKE) test-typescript asyncapi-check

# The binary the TypeScript tests run as a worker and the AsyncAPI check asks
# for its document (the debug build `cargo test` made too).
BURROW_BIN ?= $(CURDIR)/target/debug/burrow
# npm ci from the committed lock files; no package's install script runs.
NPM_CI = npm ci --ignore-scripts --no-audit --no-fund

.PHONY: burrow-bin
burrow-bin:
	$(CARGO) build $(LOCKED) --all-features --bin burrow

.PHONY: test-typescript
test-typescript: broker burrow-bin ## the TypeScript publisher (clients/typescript): tsc, its tests against the broker and a burrow worker
	cd clients/typescript && $(NPM_CI) && BURROW_BIN='$(BURROW_BIN)' npm test

.PHONY: asyncapi-check
asyncapi-check: burrow-bin ## validate docs/asyncapi.yaml with AsyncAPI's own parser and compare it with `burrow asyncapi --output json`
	cd scripts/asyncapi-check && $(NPM_CI)
	node scripts/asyncapi-check/check.mjs docs/asyncapi.yaml --burrow '$(BURROW_BIN)'

lint: ## check formatting and clippy warnings
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --all-features -- -D warnings

containers-lint: ## lint the Dockerfile and docker-compose.yml
	bash scripts/lint-containers.sh

.PHONY: monitoring-lint
monitoring-lint: ## check the alert rules (promtool check and unit tests), the PrometheusRule copy and the Grafana dashboard
	bash scripts/check-monitoring.sh

run: broker ## run the worker in the foreground
	$(CARGO) run --release -- run

fuzz: ## fuzz the decode and header path (FUZZ_SECONDS, default 60)
	bash scripts/fuzz.sh

.PHONY: bench
bench: broker ## benchmark burrow against hand-written lapin loops (N=20000 make bench for a quick run)
	bash scripts/bench.sh

.PHONY: faults
faults: broker ## fault injection: events lost / handled twice under kills, broker crashes, partitions, alarms (FAULTS_N=20000 FAULTS_KILLS=5)
	$(CARGO) test $(LOCKED) --all-features --test faults -- --ignored --test-threads=1 --nocapture --skip fault_worker_child

.PHONY: rabbitmq4
rabbitmq4: ## make sure a RabbitMQ 4.0 node answers on 127.0.0.1:5673 beside the machine's broker (builds a Debian trixie root once; as root)
	bash scripts/ensure-rabbitmq4.sh

# The same suite against RabbitMQ 4.0: the shared-broker tests through
# AMQP_URL, the tests that start nodes of their own from the 4.0 root
# (BURROW_TEST_RABBITMQ_ROOT), and rabbitmqctl aimed at the 4.0 node.
RABBITMQ4_ENV = AMQP_URL='amqp://guest:guest@127.0.0.1:5673/%2f' \
	BURROW_TEST_RABBITMQ_ROOT="$$(bash scripts/ensure-rabbitmq4.sh root)" \
	PATH="$$(bash scripts/ensure-rabbitmq4.sh bin):$$PATH"

.PHONY: test-rabbitmq4
test-rabbitmq4: rabbitmq4 postgres browser ## run make test's whole suite against RabbitMQ 4.0 (as root)
	$(RABBITMQ4_ENV) $(CARGO) test $(LOCKED) --all-features --all-targets
	$(RABBITMQ4_ENV) $(CARGO) test $(LOCKED) --all-features --doc

.PHONY: faults-rabbitmq4
faults-rabbitmq4: rabbitmq4 ## the fault-injection suite on RabbitMQ 4.0 nodes (FAULTS_N, FAULTS_KILLS)
	$(RABBITMQ4_ENV) $(CARGO) test $(LOCKED) --all-features --test faults -- --ignored --test-threads=1 --nocapture --skip fault_worker_child
