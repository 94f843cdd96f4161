#!/usr/bin/env bash
# Make sure a RabbitMQ 4.0 node of this project's own answers on
# 127.0.0.1:5673, beside whatever RabbitMQ the machine runs on 5672 (which
# this script never stops or reconfigures).
#
# RabbitMQ 4.0 needs Erlang 26 or newer, which Debian 12 does not have; Debian
# 13 (trixie) packages RabbitMQ 4.0 on Erlang 27, but its binaries need
# trixie's libraries. So the node runs from a minimal trixie root built with
# debootstrap and entered with chroot: same kernel, network and process
# table, the root's own libraries, Erlang and RabbitMQ scripts.
#
# The root is built once in a cache folder outside the clone, so fresh clones
# reuse it; the node's data and logs live inside the root.
#
# Usage:
#   bash scripts/ensure-rabbitmq4.sh           build the root if needed, start the node if
#                                              needed, print its AMQP and management URLs
#   bash scripts/ensure-rabbitmq4.sh stop      stop that node (and nothing else)
#   bash scripts/ensure-rabbitmq4.sh ctl ARGS  rabbitmqctl ARGS against that node
#   bash scripts/ensure-rabbitmq4.sh root      print the root's path
#   bash scripts/ensure-rabbitmq4.sh bin       print the folder of host-side rabbitmqctl,
#                                              rabbitmq-diagnostics and rabbitmq-plugins
#                                              for that node (put it first on PATH so that
#                                              tools calling `rabbitmqctl` reach the 4.0 node)
#   bash scripts/ensure-rabbitmq4.sh remove    stop everything running in the root, unmount
#                                              what is mounted in it, delete it
#
# Environment:
#   BURROW_RABBITMQ4_ROOT       the root (default ${XDG_CACHE_HOME:-$HOME/.cache}/burrow/rabbitmq4-root)
#   BURROW_DEBIAN_MIRROR        Debian mirror for debootstrap (default: the one apt uses here)
#   BURROW_RABBITMQ4_WAIT_SECS  how long to wait for the node to boot (default 120)
#
# Must run as root: debootstrap, chroot and mount need it.
set -euo pipefail

ROOT="${BURROW_RABBITMQ4_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/burrow/rabbitmq4-root}"
WAIT_SECS="${BURROW_RABBITMQ4_WAIT_SECS:-120}"
SUITE=trixie

NODE=rmq4@localhost
AMQP_PORT=5673
MGMT_PORT=15673
DIST_PORT=25673
# A separate epmd (Erlang's node name registry) for the 4.0 nodes: the
# machine's epmd on 4369 belongs to its own RabbitMQ service (started by it,
# as its user, and gone when that service's node and epmd are restarted), and
# the 3.10 node's tools would list our names. Every 4.0 process, server and
# CLI, must be told this port (ERL_EPMD_PORT), or it looks on 4369.
EPMD_PORT=4370
PLUGINS=(rabbitmq_management rabbitmq_consistent_hash_exchange)

# Inside the root. The node's own directory: data, logs, configuration,
# Erlang cookie (HOME), pid file.
NODE_HOME=/var/lib/burrow-rabbitmq4
SCRIPTS=/usr/lib/rabbitmq/bin
# Written only after the root was built and rabbitmq-server installed: a
# root without it is half-built (interrupted debootstrap or apt) and is redone.
READY="$ROOT/.burrow-rabbitmq4-ready"
# Commands for the host (run them from outside the root): the CLI tools,
# already pointed at the 4.0 node.
BIN="$ROOT/host-bin"
# Written before debootstrap starts: only a folder carrying it (or empty) is
# ever deleted, so a mistyped BURROW_RABBITMQ4_ROOT cannot wipe anything else.
BUILDING="$ROOT/.burrow-rabbitmq4-building"

AMQP_URL_OUT="amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f"
MGMT_URL_OUT="http://127.0.0.1:${MGMT_PORT}/"

log() { printf 'ensure-rabbitmq4: %s\n' "$*" >&2; }
die() { printf 'ensure-rabbitmq4: error: %s\n' "$*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }
# Whether process $1 exists and is not a zombie.
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat:0:1}" != [ZX] ]]
}

tcp_open() {
  # shellcheck disable=SC2016 # $1 expands in the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" >/dev/null 2>&1
}

# The environment of every 4.0 process (server and CLI), and nothing of the
# caller's: a RABBITMQ_NODENAME or ERL_* variable meant for the 3.10 node
# must not leak in.
node_env=(
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  HOME="$NODE_HOME"
  LANG=C.UTF-8
  LC_ALL=C.UTF-8
  ERL_EPMD_PORT="$EPMD_PORT"
  ERL_EPMD_ADDRESS=127.0.0.1
  RABBITMQ_NODENAME="$NODE"
  RABBITMQ_DIST_PORT="$DIST_PORT"
  RABBITMQ_CONF_ENV_FILE="$NODE_HOME/rabbitmq-env.conf"
  RABBITMQ_CONFIG_FILE="$NODE_HOME/rabbitmq.conf"
  RABBITMQ_ENABLED_PLUGINS_FILE="$NODE_HOME/enabled_plugins"
  RABBITMQ_MNESIA_BASE="$NODE_HOME/mnesia"
  RABBITMQ_LOG_BASE="$NODE_HOME/log"
  RABBITMQ_PID_FILE="$NODE_HOME/pid"
  # Erlang distribution (node-to-node and CLI-to-node) on loopback only.
  "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
  "RABBITMQ_CTL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}"
)

in_root() { chroot "$ROOT" /usr/bin/env -i "${node_env[@]}" "$@"; }
ctl() { in_root "$SCRIPTS/rabbitmqctl" -n "$NODE" "$@"; }

require_root() {
  [[ "$(id -u)" -eq 0 ]] \
    || die "must run as root (debootstrap, chroot and mount need it): sudo bash scripts/ensure-rabbitmq4.sh${1:+ $1}"
}

check_root_path() {
  [[ "$ROOT" == /* ]] || die "BURROW_RABBITMQ4_ROOT must be an absolute path (got '$ROOT')"
  case "${ROOT%/}" in
    "" | /usr | /etc | /var | /home | "$HOME" | /root | /tmp)
      die "BURROW_RABBITMQ4_ROOT='$ROOT' is not a folder this script may own; choose a new folder"
      ;;
  esac
}

# Mount points at or under the root, deepest first (mountinfo field 5,
# with spaces and the like octal-escaped).
mounts_under_root() {
  awk -v root="${ROOT%/}" '
    function unescape(s,   out, i, c) {
      out = ""
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (c == "\\" && substr(s, i + 1, 3) ~ /^[0-7][0-7][0-7]$/) {
          out = out sprintf("%c", (substr(s, i + 1, 1) * 64) + (substr(s, i + 2, 1) * 8) + substr(s, i + 3, 1))
          i += 3
        } else {
          out = out c
        }
      }
      return out
    }
    { p = unescape($5); if (p == root || index(p, root "/") == 1) print p }
  ' /proc/self/mountinfo | sort -r
}

# Before deleting a root: unmount /proc and the test harness's bind mounts
# (the test-nodes and temp folders, which are the host's own folders: rm -rf
# through a bind mount would delete the host's files).
unmount_root() {
  local m
  while IFS= read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || die "cannot unmount $m; unmount it by hand, then run again"
  done < <(mounts_under_root)
  [[ -z "$(mounts_under_root)" ]] || die "mounts remain under $ROOT: $(mounts_under_root | tr '\n' ' ')"
}

# The Debian mirror apt already uses here (the main archive: the entry whose
# suite is this system's codename), so no new host needs to be reachable.
apt_mirror() {
  local codename
  # shellcheck disable=SC1091 # the system's file, read at run time
  codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
  [[ -n "$codename" ]] || return 0
  {
    if [[ -f /etc/apt/sources.list ]]; then cat /etc/apt/sources.list; fi
    for f in /etc/apt/sources.list.d/*.list; do [[ -f "$f" ]] && cat "$f"; done
  } | awk -v suite="$codename" '
    $1 == "deb" {
      i = 2
      if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
      if ($(i + 1) == suite) { print $i; exit }
    }'
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    awk -v suite="$codename" '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^#/) continue
          key = tolower(line); sub(/:.*/, "", key)
          val = line; sub(/^[^:]*:[ \t]*/, "", val)
          if (key == "types") types = val
          else if (key == "uris") uris = val
          else if (key == "suites") suites = val
          else if (key == "enabled") enabled = tolower(val)
        }
        if (enabled == "no" || (" " types " ") !~ / deb /) next
        if ((" " suites " ") ~ (" " suite " ")) { split(uris, u, /[ \t]+/); print u[1]; exit }
      }' "$f"
  done
}

mirror_reachable() {
  local url="${1%/}/dists/$SUITE/InRelease"
  if have curl; then
    curl -fsS --max-time 30 -o /dev/null "$url"
  elif have wget; then
    wget -q -T 30 -O /dev/null "$url"
  else
    return 0 # nothing to check with; debootstrap will tell
  fi
}

ensure_debootstrap() {
  have debootstrap && return 0
  have apt-get \
    || die "debootstrap is not installed and there is no apt-get to install it; install debootstrap with this system's package manager, then run again"
  log "installing debootstrap with apt-get"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends debootstrap >&2; }; }; then
    die "apt-get could not install debootstrap; check 'apt-get update' works (network, mirror), then run again"
  fi
}

# /proc: Erlang (and some maintainer scripts) read it. Mounted again after
# a reboot; idempotent.
mount_proc() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
}

build_root() {
  if [[ -d "$ROOT" ]] && [[ -n "$(ls -A "$ROOT")" ]]; then
    [[ -e "$BUILDING" ]] \
      || die "$ROOT exists, is not empty and was not made by this script; remove it or set BURROW_RABBITMQ4_ROOT to a new folder"
    log "$ROOT is half-built (no $(basename "$READY")); removing it and building again"
    unmount_root
    rm -rf --one-file-system "$ROOT"
  fi

  ensure_debootstrap
  local mirror="${BURROW_DEBIAN_MIRROR:-}"
  [[ -n "$mirror" ]] || mirror="$(apt_mirror | head -n 1)"
  [[ -n "$mirror" ]] \
    || die "no Debian mirror found in apt's sources (/etc/apt/sources.list, /etc/apt/sources.list.d/); set BURROW_DEBIAN_MIRROR to a Debian mirror URL (one that has the '$SUITE' suite)"
  mirror_reachable "$mirror" \
    || die "the Debian mirror $mirror does not serve dists/$SUITE/InRelease; check the network (and 'apt-get update'), or set BURROW_DEBIAN_MIRROR to a reachable Debian mirror"

  mkdir -p "$ROOT"
  : >"$BUILDING"
  local started=$SECONDS
  log "debootstrap --variant=minbase $SUITE into $ROOT from $mirror (about a minute)"
  debootstrap --variant=minbase "$SUITE" "$ROOT" "$mirror" >&2 \
    || die "debootstrap failed (see $ROOT/debootstrap/debootstrap.log if it exists); check the mirror $mirror, then run again"
  log "debootstrap took $((SECONDS - started))s"

  # The package's maintainer scripts start the service through invoke-rc.d;
  # with no init system in the root that would boot a default node on 5672
  # (the machine's broker's port, name and epmd). Exit status 101 of
  # policy-rc.d means "action forbidden": install, never start.
  printf '#!/bin/sh\n# Never start services inside this root (see scripts/ensure-rabbitmq4.sh).\nexit 101\n' \
    >"$ROOT/usr/sbin/policy-rc.d"
  chmod 0755 "$ROOT/usr/sbin/policy-rc.d"
  # debootstrap copies resolv.conf and hostname but not hosts: the node name
  # rmq4@localhost must resolve inside the root.
  printf '127.0.0.1\tlocalhost %s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$(hostname)" >"$ROOT/etc/hosts"
  mount_proc

  started=$SECONDS
  log "installing rabbitmq-server in the root"
  chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update && apt-get install -y --no-install-recommends rabbitmq-server' >&2 \
    || die "apt-get in the root could not install rabbitmq-server; check the mirror $mirror, then run again"
  log "install took $((SECONDS - started))s"

  # shellcheck disable=SC2016 # ${Version} is dpkg-query's, not the shell's
  chroot "$ROOT" dpkg-query -W -f='${Version}\n' rabbitmq-server >"$READY"
  rm -f "$BUILDING"
}

write_config() {
  local home="$ROOT$NODE_HOME"
  mkdir -p "$home/mnesia" "$home/log"
  # Empty: keeps the package's /etc/rabbitmq/rabbitmq-env.conf out; all the
  # node's settings are in node_env and rabbitmq.conf.
  : >"$home/rabbitmq-env.conf"
  cat >"$home/rabbitmq.conf" <<EOF
# Written by scripts/ensure-rabbitmq4.sh at every start: edits are overwritten.
# Every listener on loopback only.
listeners.tcp.default = 127.0.0.1:${AMQP_PORT}
management.tcp.ip = 127.0.0.1
management.tcp.port = ${MGMT_PORT}
# What RabbitMQ 4.3 removes fails here too, instead of only logging a
# deprecation warning: transient non-exclusive queues and global QoS.
deprecated_features.permit.transient_nonexcl_queues = false
deprecated_features.permit.global_qos = false
EOF
  if [[ ! -f "$home/enabled_plugins" ]]; then
    printf '[%s].\n' "$(IFS=,; printf '%s' "${PLUGINS[*]}")" >"$home/enabled_plugins"
  fi
}

# The pid of the running 4.0 node, if any: the pid file's process, and it
# runs in this root (so a reused pid of something else does not count).
node_pid() {
  local pid
  pid="$(cat "$ROOT$NODE_HOME/pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ "$(readlink "/proc/$pid/root" 2>/dev/null)" == "$(readlink -f "$ROOT")" ]] || return 1
  printf '%s\n' "$pid"
}

start_node() {
  write_config
  local logdir="$ROOT$NODE_HOME/log"
  local out="$logdir/startup.log"
  local nodelog="$logdir/$NODE.log"
  if node_pid >/dev/null; then
    log "$NODE runs but 127.0.0.1:$AMQP_PORT does not answer yet; waiting for it"
  else
    log "starting $NODE (AMQP 127.0.0.1:$AMQP_PORT, management 127.0.0.1:$MGMT_PORT, distribution $DIST_PORT, epmd $EPMD_PORT)"
    rm -f "$ROOT$NODE_HOME/pid"
    # setsid: its own session, so the node outlives this script and the
    # terminal (or make) that ran it.
    setsid chroot "$ROOT" /usr/bin/env -i "${node_env[@]}" "$SCRIPTS/rabbitmq-server" \
      >>"$out" 2>&1 </dev/null &
  fi
  local started=$SECONDS deadline=$((SECONDS + WAIT_SECS)) launcher=${!:-}
  while ! tcp_open "$AMQP_PORT"; do
    if [[ -n "$launcher" ]] && ! alive "$launcher"; then
      die "$NODE exited while starting; see $out and $nodelog"
    fi
    ((SECONDS < deadline)) \
      || die "$NODE did not answer on 127.0.0.1:$AMQP_PORT within ${WAIT_SECS}s; see $nodelog (and $out)"
    sleep 0.5
  done
  local left=$((deadline - SECONDS))
  ((left > 5)) || left=5
  ctl -q await_startup --timeout "$left" >/dev/null \
    || die "$NODE did not finish booting; see $nodelog"
  log "$NODE answered after $((SECONDS - started))s"
}

ensure_plugins() {
  local file="$ROOT$NODE_HOME/enabled_plugins" missing=() p
  for p in "${PLUGINS[@]}"; do
    grep -qw "$p" "$file" 2>/dev/null || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0
  log "enabling ${missing[*]}"
  in_root "$SCRIPTS/rabbitmq-plugins" -n "$NODE" -q enable "${missing[@]}" >&2 \
    || die "could not enable ${missing[*]} on $NODE"
}

# One small script per CLI tool in $BIN that runs the root's tool against
# $NODE, with the environment every 4.0 process needs baked in, so that a test
# or a person calling plain `rabbitmqctl` (with $BIN first on PATH) reaches
# the 4.0 node and not the machine's.
write_host_bin() {
  mkdir -p "$BIN"
  local tool file
  for tool in rabbitmqctl rabbitmq-diagnostics rabbitmq-plugins; do
    file="$BIN/$tool"
    {
      printf '#!/bin/sh\n# Written by scripts/ensure-rabbitmq4.sh: %s against %s in the RabbitMQ 4 root.\n' "$tool" "$NODE"
      printf 'exec chroot %q /usr/bin/env -i' "$ROOT"
      printf ' %q' "${node_env[@]}" "$SCRIPTS/$tool" -n "$NODE"
      printf ' "$@"\n'
    } >"$file.tmp"
    chmod 0755 "$file.tmp"
    mv -f "$file.tmp" "$file"
  done
}

cmd_start() {
  require_root
  check_root_path
  [[ -f "$READY" ]] || build_root
  mount_proc
  if tcp_open "$AMQP_PORT"; then
    # Something answers; it must be our node (checked by the CLI call below).
    :
  else
    start_node
  fi
  ctl -q enable_feature_flag all >/dev/null 2>&1 \
    || die "127.0.0.1:$AMQP_PORT answers but $NODE does not (is another broker on port $AMQP_PORT?); see $ROOT$NODE_HOME/log/$NODE.log"
  ensure_plugins
  write_host_bin
  printf 'RabbitMQ %s (%s): %s management %s\n' "$(cut -d- -f1 "$READY")" "$NODE" "$AMQP_URL_OUT" "$MGMT_URL_OUT"
}

cmd_stop() {
  require_root stop
  check_root_path
  [[ -f "$READY" ]] || { log "no RabbitMQ 4 root at $ROOT; nothing to stop"; return 0; }
  local pid
  if ! pid="$(node_pid)"; then
    log "$NODE is not running"
    return 0
  fi
  mount_proc
  log "stopping $NODE (pid $pid)"
  # With the pid file, `stop` returns once the Erlang VM has exited.
  ctl -q stop "$NODE_HOME/pid" >&2 || die "rabbitmqctl stop failed; see $ROOT$NODE_HOME/log/$NODE.log"
  log "$NODE stopped"
}

cmd_remove() {
  require_root remove
  check_root_path
  [[ -d "$ROOT" ]] || { log "no root at $ROOT; nothing to remove"; return 0; }
  [[ -e "$READY" || -e "$BUILDING" ]] \
    || die "$ROOT was not made by this script; not removing it"
  if [[ -f "$READY" ]] && node_pid >/dev/null; then cmd_stop; fi
  # What else still runs in the root: its epmd, test nodes.
  local real p
  real="$(readlink -f "$ROOT")"
  for p in /proc/[0-9]*; do
    if [[ "$(readlink "$p/root" 2>/dev/null)" == "$real" ]]; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  unmount_root
  rm -rf --one-file-system "$ROOT"
  log "removed $ROOT"
}

case "${1:-start}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  ctl)
    shift
    require_root ctl
    check_root_path
    [[ -f "$READY" ]] || die "no RabbitMQ 4 root at $ROOT; run 'bash scripts/ensure-rabbitmq4.sh' first"
    mount_proc
    ctl "$@"
    ;;
  root) printf '%s\n' "$ROOT" ;;
  bin) printf '%s\n' "$BIN" ;;
  remove) cmd_remove ;;
  -h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' ;;
  *) die "unknown argument '$1' (expected: start, stop, ctl ARGS, root, bin, remove)" ;;
esac
