#!/usr/bin/env python3
"""Benchmarks of the operator against the local control plane (`make bench`).

Measures, with the release build and the operator's flags and environment as the chart renders them
with its default values (`chart_flags`: --concurrency, leader election, TTL limits, ...):
  - create -> Ready for one grant, through a direct HTTPS client (POST with a watch already open), and the
    same with `kubectl apply` + `kubectl wait` as a user would;
  - apply -> all Ready for 200 grants applied at once;
  - the operator's resident memory (VmRSS, and its peak VmHWM) holding 1,000 Ready grants;
  - with BENCH_GRANTS=N (e.g. 10000), N more grants POSTed at once on 8 connections until all are Ready,
    against a bare client making the same writes per grant (POST grant, PATCH finalizer, POST Secret,
    PATCH status) on 8 connections in the same run: the ratio is the figure, not the seconds. On by
    default up to 20,000 grants (BENCH_COMPARE=1 forces it, 0 skips it);
  - with BENCH_GRANTS=N, the memory goal's figures at exactly N Ready grants (`holding`): a fresh
    operator in a namespace of its own, N grants of 12-hour tokens POSTed at once, its RSS and KiB per
    grant once all are Ready and it is idle, the writes over 20 s at rest, then a kill -9 and a new
    process: seconds to leading and to idle again, tokens re-minted (goal 0), RSS and peak after the
    restart, writes at rest again; and the heap bytes per grant of each cache (`cache_heap_per_grant`,
    benches/cache_footprint.rs). BENCH_ONLY=holding runs only this part.
  - writes while nothing is due: the apiserver's count of write requests (all clients; only the
    operator runs) over 20 s with 1,000 Ready grants, beside its Lease renewals;
  - one grant create -> Ready against a bare client's four writes one after another, in turns (the
    ratio of the medians);
  - revocation: BENCH_DELETES grants (default 1,000; 0 skips) deleted at 100 per second; for each, the
    time from its DELETE to the grant being gone, which the finalizer allows only after the token is
    INVALID in the persisted and published status list (p50/p99/max); then again while a wave of
    renewals is due (3,000 more grants of 3-minute tokens, 1,000 of them deleted as their renewals
    run; BENCH_RENEWAL_WAVE=0 skips it);
  - a restart (SIGKILL, then start again) holding every grant: how long until the new process is ready
    and every grant has been looked at again, and how many tokens it re-minted (goal 0).
  - fairness (with BENCH_GRANTS=N; BENCH_ONLY=fairness runs only this): N grants POSTed at once in one
    namespace while grants of another namespace are deleted at 10 per second, by an operator watching
    every namespace at the chart's default --concurrency, on a control plane of its own: each
    deletion's DELETE -> grant gone (p50/p99/max), the load average then, how long grants waited in
    the operator's fair queue over the deletions, by lane (from its /metrics, read with a
    ServiceAccount token allowed `get /metrics`), and how much of the burst was still waiting.
  - the token-exchange floor (benches/exchange_floor.rs, no cluster; BENCH_ONLY=exchange_floor runs only
    this, BENCH_EXCHANGE_FLOOR=0 skips it): verify one ES256 access token and sign another with the
    operator's own code, exchanges per second on 1 and 2 threads, and a verify and a sign alone in µs;
    taken first, before the control plane starts, as the yardstick an exchange endpoint is a ratio of.

  - exchange (BENCH_ONLY=exchange, BENCH_GRANTS=N, default 10,000; a control plane of its own): the
    token endpoint as the chart runs it with verifier.tokenExchange.enabled (`serve
    --token-exchange` beside the controller with the chart's flags), with N grants Ready: exchanges a
    second over 4, 8 and 16 keep-alive HTTPS connections (benches/exchange_load.rs), p50/p99, the
    server's RSS before and after, the ratio to the floor; the same on 4 connections without and with
    a fresh DPoP proof per request (EXCHANGE_DPOP=1: the cost of proof of possession, as ratios);
    then 1,000 tokens exchanged from 100
    grants, the grants deleted at 100/s, and DELETE -> INVALID in the status list the server
    serves, per exchanged token.

Figures include kubectl's own start-up (`kubectl_overhead_s`: an apply of an unchanged grant plus a wait
on a Ready one), and everything shares the machine's cores with etcd and kube-apiserver. Batches are
timed by one watch of the grants (a list, then its events), which costs the apiserver what one more
watcher costs, not a full list every few hundred milliseconds. Prints a JSON summary at the end.
Not a test: nothing here asserts a time.

Memory diagnostics: BENCH_OPERATOR_BINARY=PATH runs that build instead of building the release one
(e.g. a saved copy, to compare two builds side by side on one control plane); BENCH_MALLOC_TRIM=1 also
reports the RSS after glibc's `malloc_trim(0)` (needs gdb; it tells live heap from memory the
allocator merely keeps, for a build on glibc's malloc: the operator's own build uses jemalloc, whose
settings are compiled in from .cargo/config.toml); _RJEM_MALLOC_CONF (jemalloc's settings at run time)
and MALLOC_* variables set in the environment reach the operator and are printed with the figures. BENCH_CLEANUP=0 leaves what the run created (for a control plane thrown away next:
cleaning up 100,000 grants takes long).
"""

import calendar
import http.client
import json
import os
import ssl
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


# Tokens are issued only for audiences an AudiencePolicy declares: the bench's, for every namespace.
AUDIENCE_POLICY = """apiVersion: delegation.nhi.dev/v1alpha1
kind: AudiencePolicy
metadata: {name: delegation-bench-tickets}
spec:
  audience: https://tickets.example.com
  namespaces: ["*"]
  allowedScopes: [tickets:read]
  maxTokenTTL: 15m
"""


class Api:
    """A direct HTTPS client for the local control plane (its admin certificate), so that single-grant
    latency is measured without a kubectl process start on either side."""

    def __init__(self, state_dir):
        with open(os.path.join(state_dir, "server-url")) as f:
            url = f.read().strip()
        host, port = url.removeprefix("https://").split(":")
        pki = os.path.join(state_dir, "pki")
        ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
        self.conn = http.client.HTTPSConnection(host, int(port), context=ctx)

    def request(self, method, path, body=None, content_type="application/json"):
        headers = {"Content-Type": content_type} if body is not None else {}
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data)


def ready(grant):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in grant.get("status", {}).get("conditions", []))


def list_grants(api, ns):
    """Every grant of the namespace (pages of 500), and the resourceVersion of the list."""
    path = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants?limit=500"
    items, cont = [], ""
    while True:
        page = api.request("GET", path + (f"&continue={cont}" if cont else ""))
        items += page["items"]
        cont = page["metadata"].get("continue")
        if not cont:
            return items, page["metadata"]["resourceVersion"]


def watch_grants(state_dir, ns, resource_version, on_event, timeout):
    """Follows the grant watch from `resource_version`, calling `on_event(type, object)` until it
    returns True (or `timeout`); a watch the apiserver closes is resumed from the last version seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        api = Api(state_dir)
        api.conn.timeout = max(1.0, deadline - time.monotonic())
        api.conn.request("GET", f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
                                f"?watch=1&allowWatchBookmarks=true&resourceVersion={resource_version}"
                                f"&timeoutSeconds={int(deadline - time.monotonic()) + 1}")
        response = api.conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"watch: {response.status} {response.read()[:300]!r}")
        for line in response:
            event = json.loads(line)
            obj = event["object"]
            if event["type"] == "ERROR":
                raise RuntimeError(f"watch: {obj}")
            resource_version = obj["metadata"]["resourceVersion"]
            if event["type"] != "BOOKMARK" and on_event(event["type"], obj):
                api.conn.close()
                return
        api.conn.close()
    raise TimeoutError(f"the watch did not see the awaited state within {timeout}s")


def create_to_ready(state_dir, ns, body, timeout=60):
    """POSTs one grant while a watch of it is already open, and returns the seconds from the POST to
    the watch showing it Ready (what a client waiting on the grant sees; no polling interval)."""
    api, watch = Api(state_dir), Api(state_dir)
    _, rv = list_grants(api, ns)
    name = body["metadata"]["name"]
    path = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
    watch.conn.timeout = timeout
    watch.conn.request("GET", f"{path}?watch=1&resourceVersion={rv}&fieldSelector=metadata.name%3D{name}"
                              f"&timeoutSeconds={timeout}")
    response = watch.conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"watch: {response.status} {response.read()[:300]!r}")
    t0 = time.monotonic()
    api.request("POST", path, body)
    for line in response:
        event = json.loads(line)
        if event["type"] in ("ADDED", "MODIFIED") and ready(event["object"]):
            elapsed = time.monotonic() - t0
            watch.conn.close()
            return elapsed
    raise TimeoutError(f"{name} was not Ready within {timeout}s")


def wait_all_ready(state_dir, ns, expected, timeout):
    """Waits until `expected` grants of the namespace are Ready: one list, then its watch (`kubectl
    wait --all` waits on each object in turn, and polling a list of thousands of grants would load
    the apiserver far more than the operator does)."""
    api = Api(state_dir)
    items, rv = list_grants(api, ns)
    ready_names = {g["metadata"]["name"] for g in items if ready(g)}
    if len(ready_names) >= expected:
        return len(ready_names)

    def seen(kind, grant):
        name = grant["metadata"]["name"]
        if kind != "DELETED" and ready(grant):
            ready_names.add(name)
        else:
            ready_names.discard(name)
        return len(ready_names) >= expected

    watch_grants(state_dir, ns, rv, seen, timeout)
    return len(ready_names)


def revocation_latencies(state_dir, ns, names, per_second=100):
    """Deletes `names` at `per_second`, and returns for each the seconds from its DELETE to the
    grant being gone (its finalizer is removed only once its tokens are INVALID in the written,
    published status list)."""
    import threading

    api = Api(state_dir)
    _, rv = list_grants(api, ns)
    deleted_at, gone_at = {}, {}
    done = threading.Event()

    def seen(kind, grant):
        name = grant["metadata"]["name"]
        if kind == "DELETED" and name in deleted_at:
            gone_at[name] = time.monotonic()
        return len(gone_at) == len(names)

    watcher = threading.Thread(target=lambda: (watch_grants(state_dir, ns, rv, seen, 600), done.set()))
    watcher.start()
    path = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
    t0 = time.monotonic()
    for i, name in enumerate(names):
        pause = t0 + i / per_second - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        deleted_at[name] = time.monotonic()
        api.request("DELETE", f"{path}/{name}")
    watcher.join()
    return sorted(gone_at[n] - deleted_at[n] for n in names)


def token_ids(state_dir, ns):
    """Grant name -> (id, renewalTime as Unix seconds) of the token its status names."""
    items, _ = list_grants(Api(state_dir), ns)
    tokens = {}
    for g in items:
        token = (g.get("status") or {}).get("token") or {}
        renewal = token.get("renewalTime")
        tokens[g["metadata"]["name"]] = (
            token.get("id"), calendar.timegm(time.strptime(renewal, "%Y-%m-%dT%H:%M:%SZ")) if renewal else 0)
    return tokens


WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "APPLY")


def apiserver_requests(api):
    """The apiserver's request counts so far, by "VERB resource[/subresource]"."""
    import re

    try:
        api.conn.request("GET", "/metrics")
        text = api.conn.getresponse().read().decode()
    except (http.client.HTTPException, OSError):
        # The apiserver closes a connection left idle (e.g. during the bare client's run): reconnect.
        api.conn.close()
        api.conn.request("GET", "/metrics")
        text = api.conn.getresponse().read().decode()
    counts = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels, value = line.rsplit(" ", 1)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = f"{fields.get('verb')} {fields.get('resource')}" + (
            f"/{fields['subresource']}" if fields.get("subresource") else "")
        counts[key] = counts.get(key, 0) + float(value)
    return counts


# Reviews are POSTed but store nothing: the authority re-checks of Ready grants (every
# --authority-recheck-period) ask SubjectAccessReviews at rest.
REVIEWS = ("subjectaccessreviews", "selfsubjectaccessreviews", "localsubjectaccessreviews", "tokenreviews")


def write_counts(api):
    """The apiserver's count of write requests so far, by "VERB resource"; reviews are not writes."""
    return {k: v for k, v in apiserver_requests(api).items()
            if k.split(" ")[0] in WRITE_VERBS and k.split(" ")[1] not in REVIEWS}


def writes_at_rest(api, seconds=20):
    """The writes the apiserver served over `seconds`: Lease renewals, all others, and which those
    others were ("VERB resource": count), so that a stray write names itself."""
    before = write_counts(api)
    time.sleep(seconds)
    grown = {k: int(v - before.get(k, 0)) for k, v in write_counts(api).items() if v > before.get(k, 0)}
    others = {k: n for k, n in grown.items() if not k.endswith(" leases")}
    return {"lease_renewals": sum(grown.values()) - sum(others.values()), "other": sum(others.values()),
            "which": others}


def apiserver_writes(api):
    """The apiserver's count of write requests so far, as (lease writes, all other writes)."""
    counts = write_counts(api)
    leases = sum(v for k, v in counts.items() if k.endswith(" leases"))
    return int(leases), int(sum(counts.values()) - leases)


def rss_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def cpu_seconds(pid):
    """User plus system CPU seconds a process has used (/proc/PID/stat, 100 ticks a second)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def trimmed_rss_mib(pid):
    """Diagnostic (BENCH_MALLOC_TRIM=1): the RSS after asking glibc to hand back the free memory it
    holds (gdb calls `malloc_trim(0)` in the operator). What remains is live heap plus code; the
    difference to the plain figure is memory the allocator keeps after the work that needed it."""
    subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "call (int) malloc_trim(0)"],
                   capture_output=True, check=False)
    return round(rss_kib(pid)[0] / 1024, 1)


def install_admission_policies(kubectl, binary, ns):
    """Grants need a requester stamped by the admission policies, and the operator trusts a stamp only
    on objects created 10 s after the stamping policy and its binding: install, wait until a dry run
    comes back stamped, then wait out the settle time. Then declare the bench's audience."""
    sh(*kubectl, "apply", "--server-side", "--force-conflicts", "--field-manager", "delegation-operator-bench",
       "-f", "-", stdin=sh(binary, "admission-policies"))
    probe = json.dumps({
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": "policy-probe"},
        "spec": {"principal": {"kind": "User", "name": "probe@example.com"}, "actorRef": {"name": "probe"},
                 "scopes": ["probe"], "audience": "https://probe.example.com", "tokenTTL": "1m"},
    })
    for _ in range(240):
        out = sh(*kubectl, "create", "--dry-run=server", "-n", ns, "-o", "jsonpath={.spec.requester.username}",
                 "-f", "-", stdin=probe, check=False)
        if out.strip():
            break
        time.sleep(0.25)
    created = [sh(*kubectl, "get", kind, "delegation-operator-stamp-requester",
                  "-o", "jsonpath={.metadata.creationTimestamp}").strip()
               for kind in ("mutatingadmissionpolicy", "mutatingadmissionpolicybinding")]
    settled = max(calendar.timegm(time.strptime(t, "%Y-%m-%dT%H:%M:%SZ")) for t in created) + 11
    time.sleep(max(0.0, settled - time.time()))
    sh(*kubectl, "apply", "-f", "-", stdin=AUDIENCE_POLICY)


def bare_grant_writes(api, ns, name):
    """The writes the operator makes for a grant, by a bare client: POST the grant, PATCH its
    finalizer, POST its Secret, PATCH its status."""
    grants = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
    api.request("POST", grants, {
        "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
        "metadata": {"name": name},
        "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                 "actorRef": {"name": "bare-agent"}, "scopes": ["tickets:read"],
                 "audience": "https://tickets.example.com", "tokenTTL": "10m"}})
    api.request("PATCH", f"{grants}/{name}", {"metadata": {"finalizers": ["bench/bare"]}},
                content_type="application/merge-patch+json")
    api.request("POST", f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-token"},
        "type": "delegation.nhi.dev/token", "data": {"token": "eHh4"}})
    api.request("PATCH", f"{grants}/{name}/status", {"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "Issued", "message": "bare",
        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
        content_type="application/merge-patch+json")


def bare_writes(state_dir, ns, count, connections=8):
    """`bare_grant_writes` for `count` grants on `connections` connections. Returns the seconds they
    took: the yardstick the operator's time is divided by."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(indices):
        api = Api(state_dir)
        for i in indices:
            bare_grant_writes(api, ns, f"bare-{i:05d}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(worker, [range(k, count, connections) for k in range(connections)]))
    return time.monotonic() - t0


def release_grants(state_dir, ns, connections=8):
    """Drops the finalizer of every grant left in `ns` (the bare client's, or the operator's once it is
    stopped), so that they can be deleted without an operator."""
    from concurrent.futures import ThreadPoolExecutor

    path = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
    names = [g["metadata"]["name"] for g in list_grants(Api(state_dir), ns)[0] if g["metadata"].get("finalizers")]

    def worker(chunk):
        api = Api(state_dir)
        for name in chunk:
            try:
                api.request("PATCH", f"{path}/{name}", {"metadata": {"finalizers": None}},
                            content_type="application/merge-patch+json")
            except RuntimeError:
                pass  # deleted meanwhile

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(worker, [names[k::connections] for k in range(connections)]))


def percentiles(latencies):
    """p50, p99 and max of sorted latencies, in seconds."""
    return {"p50_s": round(latencies[len(latencies) // 2], 3),
            "p99_s": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 3),
            "max_s": round(latencies[-1], 3)}


def post_grants(state_dir, ns, prefix, count, connections=8, token_ttl="10m", actor="bench-agent",
                audience="https://tickets.example.com"):
    """POSTs `count` grants on `connections` connections (how a bulk apply reaches the apiserver)."""
    from concurrent.futures import ThreadPoolExecutor

    def worker(indices):
        api = Api(state_dir)
        path = f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants"
        for i in indices:
            api.request("POST", path, {
                "apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
                "metadata": {"name": f"{prefix}-{i:05d}"},
                "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                         "actorRef": {"name": actor}, "scopes": ["tickets:read"],
                         "audience": audience, "tokenTTL": token_ttl}})

    with ThreadPoolExecutor(connections) as pool:
        list(pool.map(worker, [range(k, count, connections) for k in range(connections)]))


def wait_leading(log_path, since, timeout=600):
    """Waits until the operator started after log offset `since` leads: it logs "delegation-operator
    running" once it holds the Lease, its keys and status lists are loaded and its controllers run.
    After a kill -9 that includes waiting out the old leader's Lease (15 s by default)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, errors="replace") as f:
            f.seek(since)
            if "delegation-operator running" in f.read():
                return
        time.sleep(0.2)
    raise TimeoutError("the restarted operator did not start leading")


# The holding phase's grants renew after hours, so that "at rest" means at rest: with 10-minute
# tokens, 100,000 grants made Ready over many minutes are renewing somewhere all the time.
HOLDING = """apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: holding-agent}
spec:
  owner: {kind: Group, name: bench}
  allowedScopes: [tickets:read]
  allowedAudiences: [https://holding.example.com]
  maxTokenTTL: 24h
---
apiVersion: delegation.nhi.dev/v1alpha1
kind: AudiencePolicy
metadata: {name: delegation-bench-holding}
spec:
  audience: https://holding.example.com
  namespaces: ["*"]
  allowedScopes: [tickets:read]
  maxTokenTTL: 24h
"""
HOLDING_TTL = "12h"


def chart_flags():
    """The operator's flags as the chart renders them with its default values (templates/
    deployment.yaml), less what only a cluster has: the listener's address and certificate."""
    import yaml

    with open(os.path.join(ROOT, "charts/delegation-operator/values.yaml")) as f:
        values = yaml.safe_load(f)
    election, ttl, signing = values["leaderElection"], values["tokenTTL"], values["signing"]
    flags = [
        f"--leader-election={str(election['enabled']).lower()}",
        f"--leader-election-lease-duration={election['leaseDuration']}",
        f"--leader-election-renew-deadline={election['renewDeadline']}",
        f"--leader-election-retry-period={election['retryPeriod']}",
        f"--min-token-ttl={ttl['min']}", f"--max-token-ttl={ttl['max']}",
        f"--algorithm={signing['algorithm']}", f"--key-rotation-period={signing['keyRotationPeriod']}",
        f"--authority-recheck-period={values['authorityRecheckPeriod']}",
        f"--concurrency={values['concurrency']}",
    ]
    if values.get("maxGrantLifetime"):
        flags.append(f"--max-grant-lifetime={values['maxGrantLifetime']}")
    if values.get("maxGrantsPerNamespace"):
        flags.append(f"--max-grants-per-namespace={values['maxGrantsPerNamespace']}")
    return flags


def operator_command(binary, kubeconfig, ns, op_ns):
    return [binary, "run", "--kubeconfig", kubeconfig, "--namespace", ns, "--operator-namespace", op_ns,
            *chart_flags(), "--https-address", "127.0.0.1:0", "--tls-self-signed=true"]


def cpu_seconds(pid):
    """User plus system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(api, pid, timeout=1800, window=12.0, busy=0.05):
    """Waits until the operator is idle: over `window` seconds (longer than the 10 s an agent's
    `activeGrants` write may wait), under `busy` of a core and no write but Lease renewals (the
    apiserver's count, every client's: only the operator runs). Returns the monotonic time the first
    idle window began."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        began, cpu0, (_, writes0) = time.monotonic(), cpu_seconds(pid), apiserver_writes(api)
        time.sleep(window)
        cpu1, (_, writes1) = cpu_seconds(pid), apiserver_writes(api)
        if (cpu1 - cpu0) / window < busy and writes1 == writes0:
            return began
    raise TimeoutError("the operator did not become idle")


def cache_footprint(count):
    """Heap bytes per grant of each cache, filled with `count` grants as the operator keeps them
    (benches/cache_footprint.rs: an instrumented allocator, no cluster)."""
    out = subprocess.run(["cargo", "bench", "--quiet", "--locked", "--bench", "cache_footprint"], cwd=ROOT,
                         env={**os.environ, "FOOTPRINT_GRANTS": str(min(count, 100000))},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def exchange_floor():
    """Exchanges per second of a bare loop that verifies one ES256 access token and signs another, on 1
    and 2 threads, and a verify and a sign alone (benches/exchange_floor.rs: the operator's own signing
    code, no TLS or HTTP). Printed only: nothing asserts a rate."""
    out = subprocess.run(["cargo", "bench", "--quiet", "--locked", "--bench", "exchange_floor"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["exchange_floor"]


def holding(binary, kubeconfig, kubectl, state_dir, ns, count):
    """The goal's figures at `count` grants, with the chart's default flags, for a fresh operator
    watching only `ns`: its RSS once `count` grants POSTed at once are all Ready, the writes while
    nothing is due, then a kill -9 and a start: time to leading, time to idle, tokens re-minted, RSS."""
    op_ns = f"{ns}-op"
    sh(*kubectl, "create", "namespace", ns)
    sh(*kubectl, "create", "namespace", op_ns)
    log = tempfile.NamedTemporaryFile(prefix="bench-holding-", suffix=".log", delete=False)
    start = lambda: subprocess.Popen(operator_command(binary, kubeconfig, ns, op_ns),
                                     stdout=subprocess.DEVNULL, stderr=log)
    api = Api(state_dir)
    out = {}
    operator = start()
    try:
        wait_leading(log.name, 0)
        sh(*kubectl, "-n", ns, "apply", "-f", "-", stdin=HOLDING)
        t0 = time.monotonic()
        post_grants(state_dir, ns, "mem", count, token_ttl=HOLDING_TTL, actor="holding-agent",
                    audience="https://holding.example.com")
        out["posted_s"] = round(time.monotonic() - t0, 1)
        wait_all_ready(state_dir, ns, count, 7200)
        out["all_ready_s"] = round(time.monotonic() - t0, 1)
        wait_idle(api, operator.pid)
        rss, hwm = rss_kib(operator.pid)
        out["rss_mib"] = round(rss / 1024, 1)
        out["kib_per_grant"] = round(rss / count, 2)
        out["peak_rss_mib"] = round(hwm / 1024, 1)
        if os.environ.get("BENCH_MALLOC_TRIM"):
            out["rss_after_malloc_trim_mib"] = trimmed_rss_mib(operator.pid)
        # Nothing is due for hours (12-hour tokens renew after about 8).
        out["writes_in_20s_at_rest"] = writes_at_rest(api)

        before = token_ids(state_dir, ns)
        operator.kill()
        operator.wait()
        t0 = time.monotonic()
        since = os.path.getsize(log.name)
        operator = start()
        wait_leading(log.name, since, timeout=1800)
        out["restart_to_leading_s"] = round(time.monotonic() - t0, 1)
        out["restart_to_idle_s"] = round(wait_idle(api, operator.pid) - t0, 1)
        looked = time.time()
        after = token_ids(state_dir, ns)
        out["restart_reminted_tokens"] = sum(
            1 for name, (jti, renewal) in before.items()
            if after.get(name, (jti,))[0] != jti and renewal > looked)
        out["restart_renewals_due_meanwhile"] = sum(1 for _, (_, renewal) in before.items() if renewal <= looked)
        rss, hwm = rss_kib(operator.pid)
        out["rss_after_restart_mib"] = round(rss / 1024, 1)
        out["peak_rss_during_restart_mib"] = round(hwm / 1024, 1)
        out["writes_in_20s_at_rest_after_restart"] = writes_at_rest(api)
        return out
    finally:
        operator.terminate()
        operator.wait(timeout=30)


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics_reader_token(kubectl, ns):
    """A ServiceAccount token allowed `get /metrics` (as Prometheus' would be)."""
    sh(*kubectl, "-n", ns, "create", "serviceaccount", "bench-metrics")
    sh(*kubectl, "create", "clusterrole", "bench-metrics", "--verb=get", "--non-resource-url=/metrics")
    sh(*kubectl, "create", "clusterrolebinding", "bench-metrics", "--clusterrole=bench-metrics",
       f"--serviceaccount={ns}:bench-metrics")
    return sh(*kubectl, "-n", ns, "create", "token", "bench-metrics").strip()


def operator_metrics(port, token):
    """The operator's /metrics text (its listener's self-signed certificate is not checked)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=60)
    conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
    response = conn.getresponse()
    text = response.read().decode()
    if response.status != 200:
        raise RuntimeError(f"operator /metrics: {response.status} {text[:300]!r}")
    return text


def histogram(text, name, labels):
    """The cumulative buckets ([(le, count)], le ascending), count and sum of the series of histogram
    `name` whose labels include `labels`."""
    import re

    buckets, count, total = [], 0, 0.0
    for line in text.splitlines():
        if not line.startswith(name + "_"):
            continue
        series, value = line.rsplit(" ", 1)
        fields = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if any(fields.get(k) != v for k, v in labels.items()):
            continue
        if series.startswith(name + "_bucket"):
            le = fields["le"]
            buckets.append((float("inf") if le == "+Inf" else float(le), int(float(value))))
        elif series.startswith(name + "_count"):
            count = int(float(value))
        elif series.startswith(name + "_sum"):
            total = float(value)
    return sorted(buckets), count, total


def histogram_summary(text, name, labels):
    """count, mean, and the bucket bounds under which 50% and 99% of the observations fall."""
    buckets, count, total = histogram(text, name, labels)

    def bound(q):
        for le, n in buckets:
            if n >= q * count:
                return le
        return None

    if not count:
        return {"count": 0}
    return {"count": count, "mean_s": round(total / count, 4), "p50_at_most_s": bound(0.5),
            "p99_at_most_s": bound(0.99)}


def fairness_under_burst(binary, count, deletes=600, per_second=10):
    """`count` grants POSTed at once (8 connections) in one namespace while `deletes` grants of another
    namespace, Ready before, are deleted at `per_second` from the moment the burst starts; the
    operator watches every namespace, at the chart's default --concurrency. Runs on a control plane of
    its own (removed afterwards): an operator of every namespace must meet no other run's grants.
    Returns each deletion's DELETE -> gone (p50/p99/max), how much of the burst was not Ready yet
    when the last deletion was done (the deletions did overlap the burst), the load average then,
    and the operator's own account of its fair queue over the deletions (`queue_wait`, from its
    /metrics: how long grants waited for a reconcile slot, by lane, and how many still waited).
    BENCH_FAIRNESS_LOG=PATH keeps the operator's log there."""
    import threading

    script = os.path.join(ROOT, "hack/control-plane.sh")
    env = dict(os.environ, CONTROL_PLANE_DIR=tempfile.mkdtemp(prefix="bench-fairness-cp-"))
    kubeconfig = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                                check=True).stdout.strip()
    operator = None
    log_path = os.environ.get("BENCH_FAIRNESS_LOG")
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        env_lines = subprocess.run([script, "env"], env=env, capture_output=True, text=True, check=True).stdout
        bin_dir = [l.split("=", 1)[1].split(":")[0] for l in env_lines.splitlines()
                   if l.startswith("export PATH=")][0]
        kubectl = [os.path.join(bin_dir, "kubectl"), "--kubeconfig", kubeconfig]
        state_dir = os.path.dirname(kubeconfig)
        sh(*kubectl, "apply", "--server-side", "-f", os.path.join(ROOT, "crds"))
        sh(*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        busy, steady = "fair-burst", "fair-steady"
        for namespace in (busy, steady, "fair-op"):
            sh(*kubectl, "create", "namespace", namespace)
        install_admission_policies(kubectl, binary, steady)
        token, port = metrics_reader_token(kubectl, "fair-op"), free_port()
        operator = subprocess.Popen(
            [binary, "run", "--kubeconfig", kubeconfig, "--operator-namespace", "fair-op",
             *chart_flags(), "--https-address", f"127.0.0.1:{port}", "--tls-self-signed=true"],
            stdout=log, stderr=log)
        for namespace in (busy, steady):
            sh(*kubectl, "-n", namespace, "apply", "-f", "-", stdin=AGENT)
        post_grants(state_dir, steady, "steady", deletes)
        wait_all_ready(state_dir, steady, deletes, 600)
        before = operator_metrics(port, token)

        burst = threading.Thread(target=post_grants, args=(state_dir, busy, "burst", count))
        t0 = time.monotonic()
        burst.start()
        latencies = revocation_latencies(state_dir, steady, [f"steady-{i:05d}" for i in range(deletes)],
                                         per_second)
        load = os.getloadavg()
        after = operator_metrics(port, token)
        items, _ = list_grants(Api(state_dir), busy)
        waiting = count - sum(1 for g in items if ready(g))
        burst.join()
        wait_all_ready(state_dir, busy, count, 3600)
        queue_wait = {}
        for lane in ("revocation", "routine"):
            # Over the deletions only: what the steady namespace's grants waited before is taken off.
            buckets_after, count_after, sum_after = histogram(
                after, "delegation_grant_queue_wait_seconds", {"lane": lane})
            buckets_before, count_before, sum_before = histogram(
                before, "delegation_grant_queue_wait_seconds", {"lane": lane})
            earlier = dict(buckets_before)
            delta = "\n".join(
                [f'delegation_grant_queue_wait_seconds_bucket{{lane="{lane}",le="{le}"}} {n - earlier.get(le, 0)}'
                 for le, n in buckets_after]
                + [f'delegation_grant_queue_wait_seconds_count{{lane="{lane}"}} {count_after - count_before}',
                   f'delegation_grant_queue_wait_seconds_sum{{lane="{lane}"}} {sum_after - sum_before}'])
            queue_wait[lane] = histogram_summary(delta, "delegation_grant_queue_wait_seconds", {"lane": lane})
        return {
            "flags": " ".join(chart_flags()),
            f"deletes_at_{per_second}_per_s": deletes,
            "deletion_to_gone": percentiles(latencies),
            "load_average_1_5_15_when_the_deletions_were_done": [round(x, 2) for x in load],
            "queue_wait_over_the_deletions": queue_wait,
            "burst_grants_not_ready_when_the_deletions_were_done": waiting,
            "burst_all_ready_s": round(time.monotonic() - t0, 1),
        }
    finally:
        if operator:
            operator.terminate()
            operator.wait(timeout=10)
        if log_path:
            log.close()
        subprocess.run([script, "stop"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", env["CONTROL_PLANE_DIR"]])


EXCHANGE_AGENT = """apiVersion: delegation.nhi.dev/v1alpha1
kind: AgentIdentity
metadata: {name: bench-agent}
spec:
  owner: {kind: Group, name: bench}
  serviceAccountName: bench-agent
  allowedScopes: [tickets:read]
  allowedAudiences: [https://tickets.example.com]
  maxTokenTTL: 15m
"""


def status_of(list_token, idx):
    """The status at `idx` of a Status List Token's list (read unverified: the bench times what the
    server serves; the tests verify it)."""
    import base64
    import zlib

    payload = list_token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    bits, lst = claims["status_list"]["bits"], claims["status_list"]["lst"]
    data = zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))
    per_byte = 8 // bits
    return (data[idx // per_byte] >> ((idx % per_byte) * bits)) & ((1 << bits) - 1)


def exchange_under_load(binary, count, pods=100, lineage_grants=100, per_grant=10):
    """The token endpoint as the chart runs it with verifier.tokenExchange.enabled (`serve
    --token-exchange`, beside the controller with the chart's flags), with `count` grants Ready, on a
    control plane of its own: exchanges a second over keep-alive HTTPS (benches/exchange_load.rs,
    `pods` pods' pod-bound tokens), p50/p99, the server's RSS before and after; then lineage
    revocation: `per_grant` tokens exchanged from each of `lineage_grants` grants, the grants deleted
    at 100/s, and for each exchanged token the seconds from its grant's DELETE until the status list
    the server serves says INVALID at its entry."""
    import threading

    script = os.path.join(ROOT, "hack/control-plane.sh")
    env = dict(os.environ, CONTROL_PLANE_DIR=tempfile.mkdtemp(prefix="bench-exchange-cp-"))
    kubeconfig = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                                check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="bench-exchange-")
    os.chmod(work, 0o700)
    processes = []
    try:
        env_lines = subprocess.run([script, "env"], env=env, capture_output=True, text=True, check=True).stdout
        bin_dir = [l.split("=", 1)[1].split(":")[0] for l in env_lines.splitlines()
                   if l.startswith("export PATH=")][0]
        kubectl = [os.path.join(bin_dir, "kubectl"), "--kubeconfig", kubeconfig]
        state_dir = os.path.dirname(kubeconfig)
        sh(*kubectl, "apply", "--server-side", "-f", os.path.join(ROOT, "crds"))
        sh(*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        ns, op_ns = "ex-bench", "ex-op"
        for namespace in (ns, op_ns):
            sh(*kubectl, "create", "namespace", namespace)
        install_admission_policies(kubectl, binary, ns)
        sh(*kubectl, "-n", ns, "create", "serviceaccount", "bench-agent")
        sh(*kubectl, "-n", ns, "apply", "-f", "-", stdin=EXCHANGE_AGENT)
        controller_port, port = free_port(), free_port()
        issuer = f"https://127.0.0.1:{port}"
        log = open(os.path.join(work, "controller.log"), "w")
        processes.append(subprocess.Popen(
            [binary, "run", "--kubeconfig", kubeconfig, "--operator-namespace", op_ns, *chart_flags(),
             "--issuer", issuer, "--verification-endpoints=false",
             "--https-address", f"127.0.0.1:{controller_port}", "--tls-self-signed=true"],
            stdout=subprocess.DEVNULL, stderr=log))
        t0 = time.monotonic()
        post_grants(state_dir, ns, "ex", count)
        wait_all_ready(state_dir, ns, count, 3600)
        ready_s = round(time.monotonic() - t0, 1)

        # The server, its certificate from the controller's self-signed TLS Secret, as mounted.
        for _ in range(240):
            tls = json.loads(sh(*kubectl, "-n", op_ns, "get", "secret", "delegation-operator-tls",
                                "-o", "json", check=False) or "{}")
            if tls.get("data"):
                break
            time.sleep(0.25)
        import base64
        for key in ("tls.crt", "tls.key", "ca.crt"):
            path = os.path.join(work, key)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(base64.b64decode(tls["data"][key]))
        serve_log = open(os.path.join(work, "serve.log"), "w")
        server = subprocess.Popen(
            [binary, "serve", "--kubeconfig", kubeconfig, "--operator-namespace", op_ns, "--issuer", issuer,
             "--https-address", f"127.0.0.1:{port}", "--tls-cert-file", os.path.join(work, "tls.crt"),
             "--tls-key-file", os.path.join(work, "tls.key"), "--token-exchange=true"],
            stdout=subprocess.DEVNULL, stderr=serve_log)
        processes.append(server)
        ctx = ssl.create_default_context(cafile=os.path.join(work, "ca.crt"))

        def https(method, path, body=None):
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()

        for _ in range(600):
            try:
                if https("GET", "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)

        # Pods running as the agent's ServiceAccount, and a token bound to each, for the issuer.
        pod_docs = "\n---\n".join(
            f"""apiVersion: v1
kind: Pod
metadata: {{name: agent-{i:03d}}}
spec:
  serviceAccountName: bench-agent
  containers: [{{name: agent, image: registry.invalid/agent}}]""" for i in range(pods))
        sh(*kubectl, "-n", ns, "apply", "-f", "-", stdin=pod_docs)
        actors = [sh(*kubectl, "-n", ns, "create", "token", "bench-agent", "--audience", issuer,
                     "--bound-object-kind", "Pod", "--bound-object-name", f"agent-{i:03d}",
                     "--duration", "1h").strip() for i in range(pods)]

        def grant_token(name):
            out = sh(*kubectl, "-n", ns, "get", "secret", f"{name}-token", "-o", "jsonpath={.data.token}")
            return base64.b64decode(out).decode()

        requests = [{"subject": grant_token(f"ex-{i:05d}"), "actor": actors[i], "scope": "tickets:read"}
                    for i in range(pods)]
        requests_path = os.path.join(work, "requests.json")
        with open(os.open(requests_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(requests, f)
        rss_before = rss_kib(server.pid)[0] / 1024
        # The same load on 4, 8 and 16 connections: with more requests in flight the rate grows
        # until the cores are busy, and then each request waits longer for its turn.
        def load(connections, dpop=False, seconds=None):
            cpu_before = cpu_seconds(server.pid)
            length = {"EXCHANGE_SECONDS": str(seconds)} if seconds else {}
            result = json.loads(subprocess.run(
                ["cargo", "bench", "--quiet", "--locked", "--bench", "exchange_load"], cwd=ROOT,
                env={**os.environ, "EXCHANGE_ISSUER": issuer, "EXCHANGE_CA": os.path.join(work, "ca.crt"),
                     "EXCHANGE_REQUESTS": requests_path, "EXCHANGE_CONNECTIONS": str(connections),
                     "EXCHANGE_DPOP": "1" if dpop else "0", **length},
                capture_output=True, text=True, check=True).stdout)["exchange_load"]
            # The server's own CPU per answered request (warm-up included in both counts).
            answered = sum(result["answers_by_status"].values())
            result["server_cpu_us_per_exchange"] = round(
                (cpu_seconds(server.pid) - cpu_before) * 1e6 / max(answered, 1)
                * result["seconds"] / (result["seconds"] + float(os.environ.get("EXCHANGE_WARMUP_SECONDS", 3))), 1)
            return result

        loads = {}
        for connections in (4, 8, 16):
            loads[connections] = load(connections)
        # DPoP: every request with a fresh proof by its worker's key (verified, replay-checked, and
        # the token bound to it), against the same load without, back to back on 4 connections.
        # 10 s each: one namespace's proofs then stay under half the replica's replay cache, past
        # which a single namespace is held to its share (429), as any one tenant would be.
        bearer, dpop = load(4, seconds=10), load(4, dpop=True, seconds=10)
        dpop_vs_bearer = {
            "bearer": bearer, "dpop": dpop,
            "p50_ratio": round(dpop["p50_ms"] / max(bearer["p50_ms"], 1e-9), 2),
            "p99_ratio": round(dpop["p99_ms"] / max(bearer["p99_ms"], 1e-9), 2),
            "rate_ratio": round(bearer["exchanges_per_s"] / max(dpop["exchanges_per_s"], 1), 2),
            "server_cpu_ratio": round(dpop["server_cpu_us_per_exchange"]
                                      / max(bearer["server_cpu_us_per_exchange"], 1e-9), 2),
        }
        rss_after, peak = (kib / 1024 for kib in rss_kib(server.pid))
        issued = sum(l["answers_by_status"].get("200", 0) for l in [*loads.values(), bearer, dpop])

        # Lineage: tokens exchanged from grants that are then deleted.
        import urllib.parse
        lineage = []  # (grant, uri, idx)
        for g in range(lineage_grants):
            name = f"ex-{count - 1 - g:05d}"
            subject = grant_token(name)
            for _ in range(per_grant):
                status, body = https("POST", "/token", urllib.parse.urlencode({
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token": subject,
                    "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "actor_token": actors[g % pods],
                    "actor_token_type": "urn:ietf:params:oauth:token-type:jwt"}))
                if status != 200:
                    raise RuntimeError(f"lineage exchange: HTTP {status} {body[:200]!r}")
                token = json.loads(body)["access_token"]
                payload = token.split(".")[1]
                claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
                ref = claims["status"]["status_list"]
                lineage.append((name, ref["uri"], ref["idx"]))
        deleted_at, invalid_at = {}, {}
        done = threading.Event()

        def watch_lists():
            paths = {uri: uri.removeprefix(issuer) for _, uri, _ in lineage}
            while not done.is_set():
                lists = {uri: https("GET", path)[1].decode() for uri, path in paths.items()}
                now = time.monotonic()
                for i, (name, uri, idx) in enumerate(lineage):
                    if i not in invalid_at and name in deleted_at and status_of(lists[uri], idx) != 0:
                        invalid_at[i] = now
                if len(invalid_at) == len(lineage):
                    done.set()
                time.sleep(0.02)

        watcher = threading.Thread(target=watch_lists)
        watcher.start()
        api = Api(state_dir)
        names = sorted({name for name, _, _ in lineage})
        t_start = time.monotonic()
        for k, name in enumerate(names):
            time.sleep(max(0.0, t_start + k / 100 - time.monotonic()))
            deleted_at[name] = time.monotonic()
            api.request("DELETE", f"/apis/delegation.nhi.dev/v1alpha1/namespaces/{ns}/delegationgrants/{name}")
        done.wait(120)
        done.set()
        watcher.join()
        latencies = sorted(invalid_at[i] - deleted_at[name] for i, (name, _, _) in enumerate(lineage)
                           if i in invalid_at)
        return {
            "grants_ready": count, "grants_all_ready_s": ready_s,
            "server": "serve --token-exchange=true (the chart's verifier with verifier.tokenExchange.enabled)",
            "controller_flags": " ".join(chart_flags()),
            "load_by_connections": loads,
            "dpop_vs_bearer_4_connections": dpop_vs_bearer,
            "server_rss_mib_before_after_peak": [round(rss_before, 1), round(rss_after, 1), round(peak, 1)],
            "server_bytes_per_exchanged_token": round((rss_after - rss_before) * 1048576 / max(issued, 1), 2),
            "lineage_tokens": len(lineage),
            "lineage_invalid_seen": len(latencies),
            "lineage_delete_to_invalid_served": percentiles(latencies) if latencies else None,
        }
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        subprocess.run([script, "stop"], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", env["CONTROL_PLANE_DIR"], work])


def main():
    if os.environ.get("BENCH_ONLY") == "exchange_floor":
        print(json.dumps({"exchange_floor": exchange_floor()}, indent=2))
        return
    if os.environ.get("BENCH_ONLY") == "exchange":
        binary = os.environ.get("BENCH_OPERATOR_BINARY")
        if not binary:
            subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
            binary = os.path.join(ROOT, "target/release/delegation-operator")
        # Built before the clock starts: the load generator's first run would compile it.
        subprocess.run(["cargo", "bench", "--quiet", "--locked", "--no-run", "--bench", "exchange_load"],
                       cwd=ROOT, check=True, capture_output=True)
        # The yardstick first, with the machine's cores to itself.
        floor = exchange_floor()
        scale = int(os.environ.get("BENCH_GRANTS", "10000"))
        result = exchange_under_load(binary, scale)
        result["exchange_floor"] = floor
        best = max(load["exchanges_per_s"] for load in result["load_by_connections"].values())
        result["ratio_to_floor_2_threads"] = round(best / floor["threads_2_per_s"], 2)
        print(json.dumps({f"exchange_{scale}_grants": result}, indent=2))
        return
    if os.environ.get("BENCH_ONLY") == "fairness":
        binary = os.environ.get("BENCH_OPERATOR_BINARY")
        if not binary:
            subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
            binary = os.path.join(ROOT, "target/release/delegation-operator")
        scale = int(os.environ.get("BENCH_GRANTS", "1000"))
        print(json.dumps({f"fairness_{scale}_grants_burst": fairness_under_burst(binary, scale)}, indent=2))
        return
    # First, before this run starts the control plane and any operator, so that it has the cores.
    floor = None
    if not os.environ.get("BENCH_ONLY") and os.environ.get("BENCH_EXCHANGE_FLOOR", "1") != "0":
        floor = exchange_floor()
    kubeconfig = sh(os.path.join(ROOT, "hack/control-plane.sh"), "start").strip()
    env_lines = sh(os.path.join(ROOT, "hack/control-plane.sh"), "env")
    bin_dir = [l.split("=", 1)[1].split(":")[0] for l in env_lines.splitlines() if l.startswith("export PATH=")][0]
    kubectl = [os.path.join(bin_dir, "kubectl"), "--kubeconfig", kubeconfig]
    # BENCH_OPERATOR_BINARY: measure another build (e.g. a saved copy, to compare before and after).
    binary = os.environ.get("BENCH_OPERATOR_BINARY")
    if not binary:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        binary = os.path.join(ROOT, "target/release/delegation-operator")

    sh(*kubectl, "apply", "--server-side", "-f", os.path.join(ROOT, "crds"))
    sh(*kubectl, "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    op_ns = f"{ns}-op"
    sh(*kubectl, "create", "namespace", ns)
    sh(*kubectl, "create", "namespace", op_ns)
    k = kubectl + ["-n", ns]
    install_admission_policies(kubectl, binary, ns)

    log = tempfile.NamedTemporaryFile(prefix="bench-operator-", suffix=".log", delete=False)

    def start_operator():
        return subprocess.Popen(operator_command(binary, kubeconfig, ns, op_ns), stdout=subprocess.DEVNULL,
                                stderr=log)

    operator = start_operator()
    state_dir = os.path.dirname(kubeconfig)
    bare_ns = f"{ns}-bare"
    mem_ns = f"{ns}-mem"
    # The allocator's settings change the memory figures: name them beside the figures.
    results = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "_RJEM_MALLOC_"))}
    if floor:
        results["exchange_floor"] = floor
    scale = int(os.environ.get("BENCH_GRANTS", "0"))
    try:
        if os.environ.get("BENCH_ONLY") == "holding":
            operator.terminate()
            operator.wait(timeout=10)
            results[f"holding_{scale}_grants"] = holding(binary, kubeconfig, kubectl, state_dir, mem_ns, scale)
            results["cache_heap_per_grant"] = cache_footprint(scale)
            return
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
        results["one_grant_kubectl_apply_to_ready_s"] = {"median": round(statistics.median(single), 3),
                                                          "min": round(min(single), 3), "max": round(max(single), 3)}

        # The same without kubectl: POST the grant with a watch already open, until it shows Ready,
        # against the yardstick: the same four writes one after another by a bare client. Taken in
        # turns, 20 of each, so that both see the same load of the shared machine.
        api = Api(os.path.dirname(kubeconfig))
        sh(*kubectl, "create", "namespace", f"{ns}-one")
        direct, bare_one = [], []
        for i in range(20):
            body = {"apiVersion": "delegation.nhi.dev/v1alpha1", "kind": "DelegationGrant",
                    "metadata": {"name": f"direct-{i}"},
                    "spec": {"principal": {"kind": "User", "name": "alice@example.com"},
                             "actorRef": {"name": "bench-agent"}, "scopes": ["tickets:read"],
                             "audience": "https://tickets.example.com", "tokenTTL": "10m"}}
            direct.append(create_to_ready(state_dir, ns, body))
            t0 = time.monotonic()
            bare_grant_writes(api, f"{ns}-one", f"one-{i}")
            bare_one.append(time.monotonic() - t0)
        results["one_grant_create_to_ready_s"] = {"median": round(statistics.median(direct), 4),
                                                   "p90": round(sorted(direct)[int(len(direct) * 0.9) - 1], 4),
                                                   "max": round(max(direct), 4)}
        results["one_grant_bare_round_trip_s"] = round(statistics.median(bare_one), 4)
        results["one_grant_ratio"] = round(statistics.median(direct) / statistics.median(bare_one), 2)

        batch = "---\n".join(grant(f"batch-{i:03d}") for i in range(200))
        t0 = time.monotonic()
        sh(*k, "apply", "-f", "-", stdin=batch)
        applied = time.monotonic() - t0
        wait_all_ready(state_dir, ns, 200 + 8 + 20, 300)
        results["200_grants_apply_to_all_ready_s"] = round(time.monotonic() - t0, 2)
        results["200_grants_kubectl_apply_alone_s"] = round(applied, 2)

        rest = "---\n".join(grant(f"bulk-{i:04d}") for i in range(1000 - 200 - 8 - 20))
        sh(*k, "apply", "-f", "-", stdin=rest)
        count = wait_all_ready(state_dir, ns, 1000, 600)
        time.sleep(2)
        rss, hwm = rss_kib(operator.pid)
        results["grants_ready"] = count
        # Nothing is due for minutes (10m tokens renew after about 6): count every write for 20 s,
        # from 10 s on (an agent's activeGrants alone is written up to 10 s after its last change).
        time.sleep(10)
        results["writes_in_20s_idle_with_1000_grants"] = writes_at_rest(api)
        results["rss_with_1000_grants_mib"] = round(rss / 1024, 1)
        results["peak_rss_mib"] = round(hwm / 1024, 1)
        if os.environ.get("BENCH_MALLOC_TRIM"):
            results["rss_with_1000_grants_after_malloc_trim_mib"] = trimmed_rss_mib(operator.pid)

        # Scale, side by side in one run: BENCH_GRANTS more grants POSTed at once on 8 connections
        # until all are Ready, against a bare client making the same four writes per grant.
        compare = os.environ.get("BENCH_COMPARE", "1" if scale <= 20000 else "0") != "0"
        if scale and compare:
            sh(*kubectl, "create", "namespace", bare_ns)
            bare = bare_writes(state_dir, bare_ns, scale)
            before = apiserver_requests(api)
            t0 = time.monotonic()
            post_grants(state_dir, ns, "scale", scale)
            wait_all_ready(state_dir, ns, 1000 + scale, 3600)
            operator_s = time.monotonic() - t0
            after = apiserver_requests(api)
            # What the apiserver served per grant while they became Ready (the benchmark's own POST
            # of each grant and its one watch included; reads of 0.05 per grant or more).
            results[f"{scale}_grants_requests_per_grant"] = {
                key: round((after[key] - before.get(key, 0)) / scale, 2)
                for key in sorted(after)
                if (after[key] - before.get(key, 0)) / scale >= 0.05 and not key.startswith("WATCH")}
            time.sleep(2)
            rss, hwm = rss_kib(operator.pid)
            results[f"{scale}_grants_all_ready_s"] = round(operator_s, 1)
            results[f"{scale}_grants_bare_client_s"] = round(bare, 1)
            results[f"{scale}_grants_ratio"] = round(operator_s / bare, 2)
            results[f"rss_with_{1000 + scale}_grants_mib"] = round(rss / 1024, 1)
            results["peak_rss_mib"] = round(hwm / 1024, 1)
            if os.environ.get("BENCH_MALLOC_TRIM"):
                results[f"rss_with_{1000 + scale}_grants_after_malloc_trim_mib"] = trimmed_rss_mib(operator.pid)

        # A restart holding every grant: nothing still valid may be minted again.
        before = token_ids(state_dir, ns)
        operator.kill()
        operator.wait()
        t0 = time.monotonic()
        since = os.path.getsize(log.name)
        operator = start_operator()
        wait_leading(log.name, since)
        results["restart_to_leading_s"] = round(time.monotonic() - t0, 1)
        # Every grant is looked at again after a restart; a minute is ample for that at 10,000
        # (a Ready grant's reconcile makes no request), and a re-mint would show as a new token id.
        time.sleep(60)
        looked = time.time()
        after = token_ids(state_dir, ns)
        results["restart_grants"] = len(before)
        # A token renewed because its renewal time passed is not a re-mint; one replaced before it is.
        results["restart_reminted_tokens"] = sum(
            1 for name, (jti, renewal) in before.items()
            if after.get(name, (jti,))[0] != jti and renewal > looked)
        results["restart_renewals_due_meanwhile"] = sum(
            1 for name, (jti, renewal) in before.items() if renewal <= looked)
        results["rss_after_restart_mib"] = round(rss_kib(operator.pid)[0] / 1024, 1)

        # Revocation at 100 deletes per second.
        deletes = int(os.environ.get("BENCH_DELETES", "1000"))
        if deletes:
            names = sorted(before)[:deletes]
            latencies = revocation_latencies(state_dir, ns, names)
            results[f"revocation_{len(names)}_deletes_at_100_per_s"] = percentiles(latencies)

        # The same while a wave of renewals is due: 3,000 grants of 3-minute tokens renew from about
        # 1m42s after they were created; 1,000 of them are deleted at 100 per second from 110 s on.
        if deletes and os.environ.get("BENCH_RENEWAL_WAVE", "1") != "0":
            t0 = time.monotonic()
            post_grants(state_dir, ns, "wave", 3000, token_ttl="3m")
            wait_all_ready(state_dir, ns, len(before) - deletes + 3000, 900)
            time.sleep(max(0.0, 110 - (time.monotonic() - t0)))
            names = [f"wave-{i:05d}" for i in range(deletes)]
            latencies = revocation_latencies(state_dir, ns, names)
            results[f"revocation_{len(names)}_deletes_at_100_per_s_during_renewals"] = percentiles(latencies)

        # The goal's figures at exactly BENCH_GRANTS Ready grants (the run above holds 1,000 more): a
        # second operator, watching a namespace of its own, from idle to that many, then a kill -9.
        if scale:
            operator.terminate()
            operator.wait(timeout=10)
            results[f"holding_{scale}_grants"] = holding(binary, kubeconfig, kubectl, state_dir, mem_ns, scale)
            results["cache_heap_per_grant"] = cache_footprint(scale)
            results[f"fairness_{scale}_grants_burst"] = fairness_under_burst(binary, scale)
    finally:
        operator.terminate()
        operator.wait(timeout=10)
        print(json.dumps(results, indent=2), flush=True)
        # Cleaned up last, so that no deletion runs in the apiserver's background while measuring.
        # This control plane has no namespace controller: a deleted namespace keeps what is in it, and
        # a later cluster-wide operator (`make run`) would find every grant. So the grants (their
        # finalizers dropped first) and Secrets are deleted themselves. BENCH_CLEANUP=0 leaves them
        # (for a control plane that is thrown away next: at 100,000 grants cleaning up takes long).
        if os.environ.get("BENCH_CLEANUP") != "0":
            clean_up(kubectl, state_dir, [ns, f"{ns}-one", bare_ns, op_ns, mem_ns, f"{mem_ns}-op"])


def clean_up(kubectl, state_dir, namespaces):
    for namespace in namespaces:
        try:
            release_grants(state_dir, namespace)
        except RuntimeError:
            pass  # not created in this run
        subprocess.run([*kubectl, "delete", "delegationgrants,secrets", "--all", "-n", namespace,
                        "--wait=false"], capture_output=True)
    subprocess.run([*kubectl, "delete", "namespace", *namespaces, "--wait=false"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
