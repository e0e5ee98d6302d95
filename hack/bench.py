#!/usr/bin/env python3
"""Benchmarks of the operator against the local control plane (`make bench`).

Measures, with the release build:
  - apply -> Ready for one grant (median of several, wall clock around `kubectl apply` + `kubectl wait`);
  - apply -> all Ready for 200 grants applied at once;
  - the operator's resident memory (VmRSS, and its peak VmHWM) holding 1,000 Ready grants.

Figures include kubectl's own start-up (`kubectl_overhead_s`: an apply of an unchanged grant plus a wait
on a Ready one), and everything shares the machine's cores with etcd and kube-apiserver. Batches are
timed by polling one list every 0.2 s. Prints a JSON summary at the end.
Not a test: nothing here asserts a time.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*args, stdin=None, check=True):
    return subprocess.run(args, input=stdin, text=True, capture_output=True, check=check).stdout


def grant(name, actor="bench-agent"):
    return f"""apiVersion: delegation.nhi.dev/v1alpha1
kind: DelegationGrant
metadata: {{name: {name}}}
spec:
  principal: {{kind: User, name: alice@example.com}}
  actorRef: {{name: {actor}}}
  scopes: [tickets:read]
  audience: https://tickets.example.com
  tokenTTL: 10m
"""


AGENT = """apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: bench-agent}
spec:
  owner: {kind: Group, name: bench}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"""


def wait_all_ready(kubectl, expected, timeout):
    """Polls one list of all grants until `expected` are Ready (`kubectl wait --all` waits on each
    object in turn, which costs seconds per hundred objects and would dominate the figure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(sh(*kubectl, "get", "delegationgrants", "-o", "json"))["items"]
        ready = sum(
            1 for g in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in g.get("status", {}).get("conditions", []))
        )
        if ready >= expected:
            return ready
        time.sleep(0.2)
    raise TimeoutError(f"fewer than {expected} grants Ready after {timeout}s")


def rss_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main():
    kubeconfig = sh(os.path.join(ROOT, "hack/control-plane.sh"), "start").strip()
    env_lines = sh(os.path.join(ROOT, "hack/control-plane.sh"), "env")
    bin_dir = [l.split("=", 1)[1].split(":")[0] for l in env_lines.splitlines() if l.startswith("export PATH=")][0]
    kubectl = [os.path.join(bin_dir, "kubectl"), "--kubeconfig", kubeconfig]
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = os.path.join(ROOT, "target/release/delegation-operator")

    sh(*kubectl, "apply", "--server-side", "-f", os.path.join(ROOT, "crds"))
    sh(*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    op_ns = f"{ns}-op"
    sh(*kubectl, "create", "namespace", ns)
    sh(*kubectl, "create", "namespace", op_ns)
    k = kubectl + ["-n", ns]

    log = tempfile.NamedTemporaryFile(prefix="bench-operator-", suffix=".log", delete=False)
    operator = subprocess.Popen(
        [binary, "run", "--kubeconfig", kubeconfig, "--namespace", ns, "--operator-namespace", op_ns,
         "--concurrency", "8"],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    results = {}
    try:
        time.sleep(1)
        idle_rss, _ = rss_kib(operator.pid)
        results["rss_idle_mib"] = round(idle_rss / 1024, 1)
        sh(*k, "apply", "-f", "-", stdin=AGENT)

        # kubectl's own cost: apply an unchanged object and wait on an already-Ready one.
        sh(*k, "apply", "-f", "-", stdin=grant("warmup"))
        sh(*k, "wait", "--for=condition=Ready", "delegationgrant/warmup", "--timeout=60s")
        overhead = []
        for _ in range(5):
            t0 = time.monotonic()
            sh(*k, "apply", "-f", "-", stdin=grant("warmup"))
            sh(*k, "wait", "--for=condition=Ready", "delegationgrant/warmup", "--timeout=60s")
            overhead.append(time.monotonic() - t0)
        results["kubectl_overhead_s"] = round(statistics.median(overhead), 3)

        single = []
        for i in range(7):
            t0 = time.monotonic()
            sh(*k, "apply", "-f", "-", stdin=grant(f"one-{i}"))
            sh(*k, "wait", "--for=condition=Ready", f"delegationgrant/one-{i}", "--timeout=60s")
            single.append(time.monotonic() - t0)
        results["one_grant_apply_to_ready_s"] = {"median": round(statistics.median(single), 3),
                                                  "min": round(min(single), 3), "max": round(max(single), 3)}

        batch = "---\n".join(grant(f"batch-{i:03d}") for i in range(200))
        t0 = time.monotonic()
        sh(*k, "apply", "-f", "-", stdin=batch)
        applied = time.monotonic() - t0
        wait_all_ready(k, 200 + 8, 300)
        results["200_grants_apply_to_all_ready_s"] = round(time.monotonic() - t0, 2)
        results["200_grants_kubectl_apply_alone_s"] = round(applied, 2)

        rest = "---\n".join(grant(f"bulk-{i:04d}") for i in range(1000 - 200 - 8))
        sh(*k, "apply", "-f", "-", stdin=rest)
        count = wait_all_ready(k, 1000, 600)
        time.sleep(2)
        rss, hwm = rss_kib(operator.pid)
        results["grants_ready"] = count
        results["rss_with_1000_grants_mib"] = round(rss / 1024, 1)
        results["peak_rss_mib"] = round(hwm / 1024, 1)
    finally:
        operator.terminate()
        operator.wait(timeout=10)
        subprocess.run([*kubectl, "delete", "namespace", ns, op_ns, "--wait=false"], capture_output=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
