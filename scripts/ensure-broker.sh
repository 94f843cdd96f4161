#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on the AMQP endpoint of $AMQP_URL.
#
# Order of attempts:
#   a) the endpoint already accepts TCP connections -> done;
#   b) a local `rabbitmq-server` is installed        -> start it detached, wait;
#   c) root with apt-get                             -> install rabbitmq-server, start, wait;
#   d) docker with compose                           -> `docker compose up -d rabbitmq`, wait;
#   otherwise fail and say what to install.
# Afterwards all feature flags are enabled (quorum queues with at-least-once
# dead-lettering need the RabbitMQ 3.10 feature flags).
#
# Environment:
#   AMQP_URL          broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   BROKER_WAIT_SECS  how long to wait for a started broker (default 90)
set -euo pipefail

AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
WAIT_SECS="${BROKER_WAIT_SECS:-90}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf 'ensure-broker: %s\n' "$*" >&2; }
warn() { printf 'ensure-broker: warning: %s\n' "$*" >&2; }
die() { printf 'ensure-broker: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# --- parse AMQP_URL: scheme://[userinfo@]host[:port][/vhost][?query] ----------
[[ "$AMQP_URL" == *://* ]] || die "AMQP_URL is not a URL (expected amqp://user:pass@host:port/vhost)"
scheme="${AMQP_URL%%://*}"
rest="${AMQP_URL#*://}"
authority="${rest%%[/?]*}"
tail="${rest:${#authority}}"          # "/vhost?query" or ""
hostport="${authority##*@}"           # drop userinfo (the last '@' ends it)
userinfo=""
[[ "$authority" == *@* ]] && userinfo="yes"

case "$scheme" in
  amqp) port=5672 ;;
  amqps) port=5671 ;;
  *) die "unsupported scheme '$scheme' in AMQP_URL (expected amqp or amqps)" ;;
esac

if [[ "$hostport" == \[* ]]; then     # [ipv6]:port
  host="${hostport#\[}"
  host="${host%%\]*}"
  after="${hostport#*\]}"
  [[ "$after" == :?* ]] && port="${after#:}"
elif [[ "$hostport" == *:* ]]; then
  host="${hostport%%:*}"
  [[ -n "${hostport##*:}" ]] && port="${hostport##*:}"
else
  host="$hostport"
fi
host="${host:-localhost}"
[[ "$port" =~ ^[0-9]+$ ]] || die "invalid port '$port' in AMQP_URL"

display_host="$host"
[[ "$host" == *:* ]] && display_host="[$host]"
if [[ -n "$userinfo" ]]; then
  redacted="${scheme}://***@${display_host}:${port}${tail}"
else
  redacted="${scheme}://${display_host}:${port}${tail}"
fi

# --- helpers -----------------------------------------------------------------
tcp_open() {
  # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" >/dev/null 2>&1
}

is_local_host() {
  case "$host" in
    localhost | localhost.localdomain | 127.* | ::1 | 0.0.0.0) return 0 ;;
  esac
  [[ "$host" == "$(hostname 2>/dev/null || true)" ]]
}

# Poll until the endpoint answers or the deadline passes. With "diag", a local
# node must also pass `rabbitmq-diagnostics check_port_connectivity` (all
# listeners up); if the CLI cannot reach the node, an open port is enough.
wait_for_broker() {
  local what="$1" mode="${2:-tcp}" deadline=$((SECONDS + WAIT_SECS)) open_polls=0
  have rabbitmq-diagnostics || mode=tcp
  log "waiting up to ${WAIT_SECS}s for $what on ${display_host}:${port}"
  while ((SECONDS < deadline)); do
    if tcp_open; then
      open_polls=$((open_polls + 1))
      if [[ "$mode" == tcp ]] \
        || timeout 10 rabbitmq-diagnostics -q check_port_connectivity >/dev/null 2>&1; then
        log "broker is up"
        return 0
      fi
      if ((open_polls >= 5)); then
        warn "port is open but rabbitmq-diagnostics cannot check the node; going on"
        return 0
      fi
    fi
    sleep 1
  done
  return 1
}

start_local_server() {
  log "starting rabbitmq-server (detached)"
  # `-detached` fails if the node is already running but not yet listening;
  # the wait below decides whether that matters.
  rabbitmq-server -detached >&2 || warn "rabbitmq-server -detached exited with status $?"
  wait_for_broker "rabbitmq-server" diag \
    || die "rabbitmq-server did not answer within ${WAIT_SECS}s; see /var/log/rabbitmq/ for its logs"
}

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

have_docker_compose() {
  have docker || return 1
  docker compose version >/dev/null 2>&1 || have docker-compose || return 1
  docker info >/dev/null 2>&1 || { warn "docker is installed but its engine does not answer"; return 1; }
}

# Plugins burrow's features need; they ship with RabbitMQ. The consistent-hash
# exchange routes the shards of apps with [ordering].
PLUGINS=(rabbitmq_consistent_hash_exchange)

enable_feature_flags() {
  local how="$1"
  case "$how" in
    local)
      if have rabbitmqctl && is_local_host; then
        timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
        if timeout 60 rabbitmqctl -q enable_feature_flag all >&2; then
          log "all feature flags enabled"
        else
          warn "could not enable feature flags with rabbitmqctl (run 'rabbitmqctl enable_feature_flag all' as root or the rabbitmq user)"
        fi
        if have rabbitmq-plugins && timeout 60 rabbitmq-plugins -q enable "${PLUGINS[@]}" >/dev/null 2>&1; then
          log "plugins enabled: ${PLUGINS[*]}"
        else
          warn "could not enable ${PLUGINS[*]} (run 'rabbitmq-plugins enable ${PLUGINS[*]}' as root); apps with [ordering] need it"
        fi
      else
        log "rabbitmqctl not usable for ${display_host}; make sure all feature flags are enabled on the broker (RabbitMQ >= 3.10)"
      fi
      ;;
    docker)
      if (cd "$REPO_ROOT" && timeout 60 compose exec -T rabbitmq rabbitmqctl -q enable_feature_flag all) >&2; then
        log "all feature flags enabled"
      else
        warn "could not enable feature flags in the rabbitmq container"
      fi
      if (cd "$REPO_ROOT" && timeout 60 compose exec -T rabbitmq rabbitmq-plugins -q enable "${PLUGINS[@]}") >/dev/null 2>&1; then
        log "plugins enabled: ${PLUGINS[*]}"
      else
        warn "could not enable ${PLUGINS[*]} in the rabbitmq container"
      fi
      ;;
  esac
}

# --- a) already up? ------------------------------------------------------------
log "checking ${redacted}"
if tcp_open; then
  log "broker answers on ${display_host}:${port}"
  enable_feature_flags local
  exit 0
fi

# Everything below starts a broker on this machine, which only helps when the
# URL points here.
is_local_host \
  || die "nothing answers on ${display_host}:${port} and it is not a local address; start that broker or point AMQP_URL at a reachable one"

# --- b) local rabbitmq-server installed -----------------------------------------
if have rabbitmq-server; then
  start_local_server
  enable_feature_flags local
  exit 0
fi

# --- c) install it with apt (root only) ------------------------------------------
if [[ "$(id -u)" -eq 0 ]] && have apt-get; then
  log "installing rabbitmq-server with apt-get"
  apt-get update >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y rabbitmq-server >&2
  PATH="$PATH:/usr/sbin:/sbin"
  if tcp_open; then # the package's maintainer scripts may have started it
    log "broker answers on ${display_host}:${port}"
  else
    start_local_server
  fi
  enable_feature_flags local
  exit 0
fi

# --- d) docker compose -----------------------------------------------------------
if have_docker_compose; then
  log "starting the rabbitmq service with docker compose"
  (cd "$REPO_ROOT" && compose up -d rabbitmq) >&2
  wait_for_broker "the rabbitmq container" \
    || die "the rabbitmq container did not answer within ${WAIT_SECS}s; see 'docker compose logs rabbitmq'"
  enable_feature_flags docker
  exit 0
fi

die "no RabbitMQ answers on ${display_host}:${port} and none can be started here.
  Install one of:
    - RabbitMQ >= 3.10 (Debian/Ubuntu: 'sudo apt-get install rabbitmq-server'), or
    - Docker with the compose plugin (then 'docker compose up -d rabbitmq'),
  or set AMQP_URL to a broker that is running."
