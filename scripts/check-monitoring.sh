#!/usr/bin/env bash
# Check the monitoring files in deploy/ (make monitoring-lint):
#   - deploy/prometheus/alerts.yml passes `promtool check rules`, and its unit
#     tests (alerts.test.yml) pass `promtool test rules`;
#   - deploy/kubernetes/prometheusrule.yaml holds exactly the same rule groups;
#   - every runbook_url names a section of docs/operations.md;
#   - deploy/grafana/burrow.json parses, and every query in it is valid PromQL.
# Which metric names they may use is checked against a running worker by
# tests/monitoring.rs (make test).
#
# Installs promtool (Debian's `prometheus` package) and PyYAML
# (`python3-yaml`) with apt-get when they are missing, as root only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

SCRIPT_NAME=check-monitoring
# shellcheck source=scripts/common.sh
source scripts/common.sh

# --- promtool ------------------------------------------------------------------
if ! have promtool; then
  if can_apt; then
    log "installing promtool with apt-get (package prometheus)"
    apt_install prometheus
    hash -r
  fi
  have promtool || die "promtool is missing; install it (Debian: apt-get install --no-install-recommends prometheus, or from https://prometheus.io/download/) and run again"
fi

# --- a Python with PyYAML ------------------------------------------------------
find_python() {
  local py
  for py in python3 /usr/bin/python3; do
    if have "$py" && "$py" -c 'import yaml' >/dev/null 2>&1; then
      printf '%s\n' "$py"
      return 0
    fi
  done
  return 1
}
if ! python="$(find_python)"; then
  if can_apt; then
    log "installing PyYAML with apt-get (package python3-yaml)"
    apt_install python3 python3-yaml
  fi
  python="$(find_python)" || die "python3 with PyYAML is missing; install it (Debian: apt-get install python3-yaml, or pip install pyyaml) and run again"
fi

# --- the rules -----------------------------------------------------------------
promtool check rules deploy/prometheus/alerts.yml
# Run from the test file's directory: its rule_files are relative to it.
(cd deploy/prometheus && promtool test rules alerts.test.yml)

# --- the PrometheusRule, the runbooks, the dashboard ---------------------------
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

"$python" - "$work/dashboard-rules.yml" <<'PY'
import json, re, sys

import yaml

failures = []

alerts = yaml.safe_load(open("deploy/prometheus/alerts.yml"))
rule = yaml.safe_load(open("deploy/kubernetes/prometheusrule.yaml"))
if rule.get("kind") != "PrometheusRule" or not str(rule.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
    failures.append("deploy/kubernetes/prometheusrule.yaml is not a monitoring.coreos.com PrometheusRule")
if rule.get("spec", {}).get("groups") != alerts["groups"]:
    a = {r.get("alert"): r for g in alerts["groups"] for r in g["rules"]}
    b = {r.get("alert"): r for g in rule.get("spec", {}).get("groups", []) for r in g["rules"]}
    differ = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    failures.append(
        "deploy/kubernetes/prometheusrule.yaml and deploy/prometheus/alerts.yml hold different rules "
        f"(differing: {', '.join(map(str, differ)) or 'group names or order'}); copy alerts.yml's groups under spec:"
    )

# GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped,
# spaces as '-'.
def slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

anchors = {
    slug(line.lstrip("#"))
    for line in open("docs/operations.md")
    if re.match(r"^#{1,6} ", line)
}
for group in alerts["groups"]:
    for r in group["rules"]:
        if "alert" not in r:
            continue
        notes = r.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not notes.get(key):
                failures.append(f"alert {r['alert']} has no {key} annotation")
        url = notes.get("runbook_url", "")
        path, _, anchor = url.partition("#")
        if not path.endswith("docs/operations.md") or anchor not in anchors:
            failures.append(f"alert {r['alert']}: runbook_url {url!r} names no section of docs/operations.md")

# The dashboard: valid JSON, and each query valid PromQL once Grafana's
# variables are replaced by values (promtool parses them as recording rules).
dashboard = json.load(open("deploy/grafana/burrow.json"))
values = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}

def exprs(panels):
    for p in panels:
        yield from exprs(p.get("panels", []))
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p.get("title", "?"), t["expr"]

def substitute(expr):
    for k, v in values.items():
        expr = expr.replace(k, v)
    return re.sub(r"\$\{?[A-Za-z_]\w*(:\w+)?\}?", ".+", expr)

queries = list(exprs(dashboard.get("panels", [])))
if not queries:
    failures.append("deploy/grafana/burrow.json has no queries")
names = [v.get("name") for v in dashboard.get("templating", {}).get("list", [])]
if "datasource" not in names:
    failures.append("deploy/grafana/burrow.json has no datasource variable")
recording = {"groups": [{"name": "dashboard", "rules": [
    {"record": f"dashboard:query_{i}", "expr": substitute(e)} for i, (_, e) in enumerate(queries)
]}]}
yaml.safe_dump(recording, open(sys.argv[1], "w"))

if failures:
    for f in failures:
        print(f"check-monitoring: error: {f}", file=sys.stderr)
    sys.exit(1)
print(f"check-monitoring: the PrometheusRule matches alerts.yml, runbook links resolve, {len(queries)} dashboard queries", file=sys.stderr)
PY
promtool check rules "$work/dashboard-rules.yml" >/dev/null \
  || { promtool check rules "$work/dashboard-rules.yml" || true; die "a query of deploy/grafana/burrow.json is not valid PromQL (above)"; }
log "ok"
