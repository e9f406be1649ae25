#!/usr/bin/env python3
"""`make lint`'s check of what the repository ships for Prometheus, with promtool only (no
schema that downloads at run time):

- deploy/prometheus-rules.yaml: `promtool check rules` on the PrometheusRule's spec.groups,
  then the unit tests of tests/prometheus/rules_test.yaml against them;
- deploy/grafana/segment-sync.json: every panel's and variable's query, Grafana's variables
  replaced by plain values, parsed by promtool as recording rules (a query Grafana would
  reject at load shows here, not on an operator's screen).

That the metrics they name are the worker's is checked by `cargo test --test ops_kit`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import yaml
except ImportError:
    # install-deps.sh installs Debian's python3-yaml; a python3 earlier on PATH (pyenv, a
    # virtualenv) does not see it.
    if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") and os.access(
        "/usr/bin/python3", os.X_OK
    ):
        os.execv("/usr/bin/python3", ["/usr/bin/python3", *sys.argv])
    sys.exit("check-monitoring: Python's yaml module is missing: run make deps")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = os.path.join(ROOT, "deploy", "prometheus-rules.yaml")
RULE_TESTS = os.path.join(ROOT, "tests", "prometheus", "rules_test.yaml")
DASHBOARDS = os.path.join(ROOT, "deploy", "grafana")

# Grafana's own variables, as a query for a 5-minute step would have them.
GRAFANA_BUILTINS = {
    "__rate_interval": "5m",
    "__interval": "1m",
    "__range": "1h",
}


def prometheus_rule_groups(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        sys.exit(f"check-monitoring: {path} must hold one PrometheusRule, found {len(rules)}")
    return {"groups": rules[0]["spec"]["groups"]}


def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))


def grafana_to_promql(expr):
    def var(m):
        name = m.group(1) or m.group(2)
        # A user variable stands in a label matcher's regex: match anything.
        return GRAFANA_BUILTINS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", var, expr)


def dashboard_queries(path):
    dash = json.load(open(path))
    out = []
    for p in panels(dash.get("panels", [])):
        for t in p.get("targets", []):
            out.append((f"panel {p.get('id')} {p.get('title')!r} {t.get('refId')}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") != "query" or not q:
            continue
        # label_values(<selector>, <label>) is Grafana's; the selector inside is PromQL.
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        out.append((f"variable {v['name']}", m.group(1) if m else q))
    return out


def run(*args):
    print("+", " ".join(args), flush=True)
    return subprocess.run(args).returncode


def main():
    # make deps unpacks promtool into .cache/bin rather than install Prometheus itself.
    cached = os.path.join(ROOT, ".cache", "bin")
    promtool = shutil.which("promtool", path=cached) or shutil.which("promtool")
    if not promtool:
        sys.exit("check-monitoring: promtool is missing: run make deps (it unpacks it into .cache/bin)")
    failed = False
    with tempfile.TemporaryDirectory(prefix="segment-sync-monitoring.") as tmp:
        rules = os.path.join(tmp, "rules.yaml")
        with open(rules, "w") as f:
            yaml.safe_dump(prometheus_rule_groups(RULES), f, sort_keys=False)
        failed |= run(promtool, "check", "rules", rules) != 0
        shutil.copy(RULE_TESTS, os.path.join(tmp, "rules_test.yaml"))
        failed |= run(promtool, "test", "rules", os.path.join(tmp, "rules_test.yaml")) != 0

        for name in sorted(os.listdir(DASHBOARDS)):
            if not name.endswith(".json"):
                continue
            queries = dashboard_queries(os.path.join(DASHBOARDS, name))
            if not queries:
                sys.exit(f"check-monitoring: {name} has no query")
            group = {
                "name": f"dashboard {name}",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
            out = os.path.join(tmp, f"dashboard-{name}.yaml")
            with open(out, "w") as f:
                yaml.safe_dump({"groups": [group]}, f, sort_keys=False)
            print(f"# {name}: {len(queries)} queries", flush=True)
            if run(promtool, "check", "rules", out) != 0:
                for i, (where, expr) in enumerate(queries):
                    print(f"  dashboard:query_{i} = {where}: {expr}")
                failed = True
    if failed:
        sys.exit("check-monitoring: failed")


if __name__ == "__main__":
    main()
