#!/usr/bin/env bash
# Make sure PostgreSQL answers on $DATABASE_URL and its database exists, for
# the outbox and inbox tests (cargo feature `postgres`).
#
# Order of attempts:
#   a) the server already accepts connections                 -> go on;
#   b) a local Debian cluster exists (pg_lsclusters)          -> start it, wait;
#   c) root with apt-get                                      -> install postgresql, start, wait;
#   otherwise fail and say what to install.
# Then, for a local server reached without a password that refuses it, allow
# local TCP logins without one (trust for 127.0.0.1 and ::1: a test machine
# only), and create the database when it is missing.
#
# Environment:
#   DATABASE_URL     default postgres://postgres@127.0.0.1:5432/test
#   PG_WAIT_SECS     how long to wait for a started server (default 60)
set -euo pipefail

DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
WAIT_SECS="${PG_WAIT_SECS:-60}"

log() { printf 'ensure-postgres: %s\n' "$*" >&2; }
die() { printf 'ensure-postgres: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# --- parse DATABASE_URL: postgres[ql]://[user[:password]@]host[:port][/database][?query]
case "$DATABASE_URL" in
  postgres://* | postgresql://*) ;;
  *) die "DATABASE_URL must start with postgres:// (e.g. postgres://postgres@127.0.0.1:5432/test)" ;;
esac
rest="${DATABASE_URL#*://}"
authority="${rest%%[/?]*}"
path="${rest:${#authority}}"
path="${path%%\?*}"
database="${path#/}"
database="${database:-postgres}"
hostport="${authority##*@}"
user="postgres"
if [[ "$authority" == *@* ]]; then
  userinfo="${authority%@*}"
  user="${userinfo%%:*}"
fi
host="${hostport%%:*}"
port=5432
[[ "$hostport" == *:* ]] && port="${hostport##*:}"
host="${host:-127.0.0.1}"
[[ "$port" =~ ^[0-9]+$ ]] || die "invalid port '$port' in DATABASE_URL"
[[ "$database" =~ ^[A-Za-z0-9_]+$ ]] || die "database name '$database' must be letters, digits or '_'"
# The same URL on the maintenance database, for CREATE DATABASE.
admin_url="${DATABASE_URL%%\?*}"
admin_url="${admin_url%/*}/postgres"
[[ "$rest" == */* ]] || admin_url="${DATABASE_URL%%\?*}/postgres"
display="postgres://${user}@${host}:${port}/${database}"

is_local() {
  case "$host" in localhost | 127.* | ::1 | "[::1]") return 0 ;; esac
  return 1
}

tcp_open() {
  # shellcheck disable=SC2016 # $1/$2 expand in the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$host" "$port" >/dev/null 2>&1
}

wait_for_server() {
  local deadline=$((SECONDS + WAIT_SECS))
  log "waiting up to ${WAIT_SECS}s for PostgreSQL on ${host}:${port}"
  while ((SECONDS < deadline)); do
    if have pg_isready; then
      pg_isready -q -h "$host" -p "$port" && return 0
    elif tcp_open; then
      return 0
    fi
    sleep 1
  done
  return 1
}

start_local_clusters() {
  have pg_lsclusters || return 1
  local started=1 version cluster
  while read -r version cluster _; do
    [[ -n "$version" ]] || continue
    log "starting cluster $version/$cluster"
    pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start >&2 || true
    started=0
  done < <(pg_lsclusters --no-header 2>/dev/null)
  return "$started"
}

# --- a) / b) / c): a server that answers ---------------------------------------
if ! { have pg_isready && pg_isready -q -h "$host" -p "$port"; } && ! tcp_open; then
  is_local || die "nothing answers on ${host}:${port}; start PostgreSQL there or point DATABASE_URL at a running server"
  if ! start_local_clusters; then
    if [[ "$(id -u)" -eq 0 ]] && have apt-get; then
      log "installing postgresql with apt-get"
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
      start_local_clusters || die "postgresql is installed but has no cluster; create one with pg_createcluster"
    else
      die "PostgreSQL is not installed; install it (Debian: apt-get install postgresql) or set DATABASE_URL"
    fi
  fi
  wait_for_server || die "PostgreSQL did not answer within ${WAIT_SECS}s; see /var/log/postgresql/"
fi
log "PostgreSQL answers on ${host}:${port}"

if ! have psql; then
  if [[ "$(id -u)" -eq 0 ]] && have apt-get; then
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-client >&2
  else
    die "psql is missing; install it (Debian: apt-get install postgresql-client)"
  fi
fi

psql_admin() { PGCONNECT_TIMEOUT=5 psql "$admin_url" -X -q -v ON_ERROR_STOP=1 -tA "$@"; }

# --- logins without a password on a local test server --------------------------
if ! err="$(psql_admin -c 'SELECT 1' 2>&1 >/dev/null)"; then
  if [[ "$err" == *"password authentication failed"* || "$err" == *"no password supplied"* || "$err" == *"no pg_hba.conf entry"* ]] \
    && is_local && [[ "$(id -u)" -eq 0 ]] && have pg_lsclusters; then
    while read -r version cluster cport _; do
      [[ "$cport" == "$port" ]] || continue
      hba="/etc/postgresql/$version/$cluster/pg_hba.conf"
      [[ -f "$hba" ]] || continue
      log "allowing local TCP logins without a password in $hba (test server)"
      {
        echo "# added by burrow's scripts/ensure-postgres.sh for local tests"
        echo "host all all 127.0.0.1/32 trust"
        echo "host all all ::1/128 trust"
        cat "$hba"
      } >"$hba.new" && mv "$hba.new" "$hba"
      chown postgres:postgres "$hba" 2>/dev/null || true
      pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" reload >&2
    done < <(pg_lsclusters --no-header 2>/dev/null)
    psql_admin -c 'SELECT 1' >/dev/null || die "cannot log in as $user on ${host}:${port}; check DATABASE_URL"
  else
    die "cannot log in to ${display%/*}/postgres: ${err//$'\n'/ }"
  fi
fi

# --- the database --------------------------------------------------------------
if [[ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$database'")" != 1 ]]; then
  log "creating database $database"
  psql_admin -c "CREATE DATABASE \"$database\"" >/dev/null
fi
log "database ready: $display"
