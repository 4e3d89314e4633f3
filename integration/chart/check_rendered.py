#!/usr/bin/env python3
"""Checks on a rendered Shoal chart that schema validation cannot make: the wiring between
objects (Service selectors match pods, named ports exist, referenced ConfigMaps and Secrets are
rendered), the security settings every container must have, and the shape of the two CRDs
(ServiceMonitor, PrometheusRule) for which no schema is bundled.

    check_rendered.py RENDERED.yaml [--existing-secret NAME]

Prints one line per problem and exits 1 if there is any.
"""
import argparse
import json
import re
import sys

import yaml

WORKLOADS = ("StatefulSet", "DaemonSet", "Deployment", "Job")
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"].get("labels", {})


def check_upstreams(by_kind):
    """origin.toml parses as TOML; every [[upstream]]'s password_file and ca_file is under a
    volume mounted into the origin container (which upstreams the nodes mirror is checked by
    test_chart_render.sh, which knows the values)."""
    import tomllib

    problems = []
    upstreams = []
    for cm in by_kind.get("ConfigMap", []):
        text = cm.get("data", {}).get("origin.toml")
        if text is None:
            continue
        try:
            upstreams = tomllib.loads(text).get("upstream", [])
        except tomllib.TOMLDecodeError as e:
            problems.append(f"ConfigMap/{cm['metadata']['name']}: origin.toml is not TOML: {e}")
    origins = [s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"].endswith("origin")]
    mounts = []
    for o in origins:
        for c in pod_spec(o)["containers"]:
            if c["name"] == "origin":
                mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
    for u in upstreams:
        for key in ("password_file", "ca_file"):
            path = u.get(key)
            if path and not any(path.startswith(m.rstrip("/") + "/") for m in mounts):
                problems.append(f"upstream {u.get('registry')}: {key} {path} is on no volume of the origin")
    if upstreams:
        print(f"{len(upstreams)} upstreams, their files on the origin's volumes")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--existing-secret", default=None)
    args = ap.parse_args()
    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}

    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    if not workloads:
        problems.append("no workloads rendered")
    for w in workloads:
        wname = f'{w["kind"]}/{w["metadata"]["name"]}'
        spec = pod_spec(w)
        sel = w["spec"].get("selector", {}).get("matchLabels")
        if w["kind"] != "Job" and not sel:
            problems.append(f"{wname}: no selector")
        if sel and any(pod_labels(w).get(k) != v for k, v in sel.items()):
            problems.append(f"{wname}: selector {sel} does not match its pod labels")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{wname}: mounts a service account token (Shoal never uses the API)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_names = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                problems.append(f"{wname}: volume {v['name']} names ConfigMap {v['configMap']['name']}, not rendered")
        long_running = w["kind"] != "Job"
        for c in spec.get("initContainers", []) + spec["containers"]:
            cname = f"{wname}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cname}: root filesystem not read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cname}: allowPrivilegeEscalation not false")
            if sc.get("privileged"):
                problems.append(f"{cname}: privileged")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cname}: capabilities not dropped")
            if not c.get("resources", {}).get("requests"):
                problems.append(f"{cname}: no resource requests")
            ports = {p["name"]: p for p in c.get("ports", []) if "name" in p}
            is_init = c in spec.get("initContainers", [])
            probes = ["readinessProbe"] if (long_running and not is_init) else []
            if long_running and not is_init and w["spec"]["template"]["metadata"]["labels"].get(
                    "app.kubernetes.io/component") != "restore":
                probes += ["livenessProbe", "startupProbe"]
            for p in probes:
                probe = c.get(p)
                if not probe:
                    problems.append(f"{cname}: no {p}")
                    continue
                port = probe.get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    problems.append(f"{cname}: {p} uses port {port!r}, which the container does not name")
            if spec.get("hostNetwork"):
                for p in c.get("ports", []):
                    if p.get("hostPort", p["containerPort"]) != p["containerPort"]:
                        problems.append(f"{cname}: hostPort != containerPort on the host network")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes and m["name"] not in claim_names:
                    problems.append(f"{cname}: mounts undeclared volume {m['name']}")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    rendered = ("Secret", ref["name"]) in names
                    if not rendered and ref["name"] != args.existing_secret:
                        problems.append(f"{cname}: env {e['name']} names Secret {ref['name']}, neither rendered nor existing")
            run_as = sc.get("runAsUser", spec.get("securityContext", {}).get("runAsUser"))
            if run_as is None:
                problems.append(f"{cname}: no runAsUser (the image's user must be explicit)")

    # Services select the pods of some workload, and their named target ports exist there.
    for s in by_kind.get("Service", []):
        sel = s["spec"].get("selector", {})
        matches = [w for w in workloads if sel and all(pod_labels(w).get(k) == v for k, v in sel.items())]
        if not matches:
            problems.append(f"Service/{s['metadata']['name']}: selector {sel} matches no pods")
            continue
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort")
            if isinstance(tp, str):
                for w in matches:
                    named = {q.get("name") for c in pod_spec(w)["containers"] for q in c.get("ports", [])}
                    if tp not in named:
                        problems.append(f"Service/{s['metadata']['name']}: targetPort {tp} not named in {w['kind']}/{w['metadata']['name']}")
        if s["spec"].get("clusterIP") == "None" and any(w["kind"] == "StatefulSet" and w["spec"]["serviceName"] == s["metadata"]["name"] for w in matches):
            if not s["spec"].get("publishNotReadyAddresses"):
                problems.append(f"Service/{s['metadata']['name']}: a StatefulSet's headless Service must publish not-ready pods")
    for w in by_kind.get("StatefulSet", []):
        if ("Service", w["spec"]["serviceName"]) not in names:
            problems.append(f"StatefulSet/{w['metadata']['name']}: serviceName {w['spec']['serviceName']} not rendered")

    # CRDs: the shape prometheus-operator expects.
    services = by_kind.get("Service", [])
    for sm in by_kind.get("ServiceMonitor", []):
        spec = sm["spec"]
        sel = spec.get("selector", {}).get("matchLabels", {})
        chosen = [s for s in services if sel and all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
        if not chosen:
            problems.append(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service")
        for ep in spec.get("endpoints", []):
            for key in ("interval", "scrapeTimeout"):
                if key in ep and not DURATION.match(str(ep[key])):
                    problems.append(f"ServiceMonitor: bad {key} {ep[key]!r}")
            for s in chosen:
                if ep.get("port") not in {p.get("name") for p in s["spec"]["ports"]}:
                    problems.append(f"ServiceMonitor: Service/{s['metadata']['name']} has no port named {ep.get('port')}")
        if not spec.get("endpoints"):
            problems.append("ServiceMonitor: no endpoints")
    # cert-manager Certificates: a role Shoal reads, both usages, and a Secret some workload mounts.
    mounted = {
        v["secret"]["secretName"]
        for w in workloads
        for v in w["spec"]["template"]["spec"].get("volumes", [])
        if "secret" in v
    }
    for cert in by_kind.get("Certificate", []):
        spec, cname = cert["spec"], f"Certificate/{cert['metadata']['name']}"
        units = spec.get("subject", {}).get("organizationalUnits", [])
        if not any(u in ("shoal-origin", "shoal-tracker", "shoal-agent") for u in units):
            problems.append(f"{cname}: no Shoal role in organizationalUnits {units}")
        if not {"server auth", "client auth"} <= set(spec.get("usages", [])):
            problems.append(f"{cname}: needs both server auth and client auth usages")
        if spec.get("secretName") not in mounted:
            problems.append(f"{cname}: Secret {spec.get('secretName')} is mounted by no workload")
        if not spec.get("issuerRef", {}).get("name"):
            problems.append(f"{cname}: no issuer")
    for pr in by_kind.get("PrometheusRule", []):
        groups = pr["spec"].get("groups", [])
        if not groups:
            problems.append("PrometheusRule: no groups")
        for g in groups:
            for r in g.get("rules", []):
                if not r.get("alert") or not r.get("expr"):
                    problems.append(f"PrometheusRule: rule without alert or expr: {r}")
                    continue
                expr = r["expr"]
                if expr.count("(") != expr.count(")") or expr.count("{") != expr.count("}"):
                    problems.append(f"PrometheusRule {r['alert']}: unbalanced expression {expr!r}")
                if "for" in r and not DURATION.match(r["for"]):
                    problems.append(f"PrometheusRule {r['alert']}: bad for {r['for']!r}")
                if "{{" in expr:
                    problems.append(f"PrometheusRule {r['alert']}: unrendered template in expr")
    for cm in by_kind.get("ConfigMap", []):
        for key, text in cm.get("data", {}).items():
            if key.endswith(".json"):
                try:
                    dash = json.loads(text)
                except ValueError as e:
                    problems.append(f"ConfigMap/{cm['metadata']['name']}: {key} is not JSON: {e}")
                    continue
                for p in dash.get("panels", []):
                    if not p.get("targets"):
                        problems.append(f"dashboard panel {p.get('title')!r} has no queries")

    problems += check_upstreams(by_kind)

    for p in problems:
        print(p)
    print(f"{len(docs)} objects, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
