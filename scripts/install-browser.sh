#!/usr/bin/env bash
# Make sure a headless browser and its WebDriver are here for the console's
# browser test (tests/console.rs): Debian's chromium and chromium-driver.
#
#   a) chromium and chromedriver answer (or CHROMIUM / CHROMEDRIVER name
#      working binaries)                                  -> go on;
#   b) root with apt-get                                  -> install them;
#   otherwise fail and say what to install.
set -euo pipefail

log() { printf 'install-browser: %s\n' "$*" >&2; }
die() { printf 'install-browser: error: %s\n' "$*" >&2; exit 1; }

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"

works() { [[ -x "$1" ]] && "$1" --version >/dev/null 2>&1; }

if works "$CHROMIUM" && works "$CHROMEDRIVER"; then
  exit 0
fi

if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  log "installing chromium and chromium-driver from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
  works "$CHROMIUM" || die "$CHROMIUM does not run after installing chromium"
  works "$CHROMEDRIVER" || die "$CHROMEDRIVER does not run after installing chromium-driver"
  log "$("$CHROMEDRIVER" --version | head -n 1)"
  exit 0
fi

die "the console's browser test needs Chromium and ChromeDriver: install them \
(Debian: apt-get install chromium chromium-driver), or set CHROMIUM and CHROMEDRIVER \
to binaries of the same version"
