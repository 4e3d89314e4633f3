#!/usr/bin/env python3
"""Checks on a rendered Shoal chart that schema validation cannot make: every document is YAML
without a duplicate key (parsers keep the last silently, kubectl refuses), the wiring between
objects (Service selectors match pods, named ports exist, referenced ConfigMaps and Secrets are
rendered, spread constraints select their own pods), the security settings every container
must have, the origin's config file in a Secret (never a ConfigMap), and the shape of the two
CRDs (ServiceMonitor, PrometheusRule) for which no schema is bundled.

    check_rendered.py RENDERED.yaml [--existing-secret NAME] [--values VALUES.yaml ...]

With --values (the chart's values.yaml, then the files the rendering used), the rendered
origin.toml and node setup are checked against the `upstreams` value too.

Prints one line per problem and exits 1 if there is any.
"""
import argparse
import base64
import json
import re
import sys

import yaml

WORKLOADS = ("StatefulSet", "DaemonSet", "Deployment", "Job")
DURATION = re.compile(r"^[0-9]+(ms|s|m|h|d|w|y)$")


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def pod_spec(obj):
    return obj["spec"]["template"]["spec"]


def pod_labels(obj):
    return obj["spec"]["template"]["metadata"].get("labels", {})


def merge(base, over):
    """Helm's merge of a values file over the chart's values: maps merge, the rest replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def floats(table, where):
    """Float settings in a Shoal config: it has none, so each is an integer Helm made a float."""
    for k, v in table.items():
        if isinstance(v, float):
            yield f"{where}{k} = {v!r}"
        elif isinstance(v, dict):
            yield from floats(v, f"{where}{k}.")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                if isinstance(x, dict):
                    yield from floats(x, f"{where}{k}[{i}].")
                elif isinstance(x, float):
                    yield f"{where}{k}[{i}] = {x!r}"


def file_source(spec, container, path):
    """The (Secret name, key) kubelet puts at `path` in `container`, or a problem (str)."""
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"]))
    mount = next((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if mount is None:
        return f"{path} is on no volume of the origin"
    rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
    volume = next((v for v in spec.get("volumes", []) if v["name"] == mount["name"]), {})
    secrets = [volume["secret"] | {"name": volume["secret"].get("secretName")}] if "secret" in volume else [
        src["secret"] for src in volume.get("projected", {}).get("sources", []) if "secret" in src]
    for sec in secrets:
        if "items" not in sec and "/" not in rel:
            return (sec["name"], rel)  # every key of the Secret, at its own name
        for item in sec.get("items", []):
            if item["path"] == rel:
                return (sec["name"], item["key"])
    return f"{path}: no Secret item of volume {mount['name']} is put there"


def config_files(by_kind):
    """(kind, name, key, text) of every origin.toml and agent.toml rendered, Secrets decoded."""
    for kind in ("ConfigMap", "Secret"):
        for obj in by_kind.get(kind, []):
            for key in ("origin.toml", "agent.toml"):
                if kind == "ConfigMap" and key in obj.get("data", {}):
                    yield kind, obj["metadata"]["name"], key, obj["data"][key]
                elif kind == "Secret" and key in obj.get("data", {}):
                    yield kind, obj["metadata"]["name"], key, base64.b64decode(obj["data"][key]).decode()


def check_configs(by_kind, values):
    """origin.toml (in a Secret: it may hold passwords and cluster secrets, which a ConfigMap
    shows to the `view` role) and agent.toml parse as TOML without floats, and the origin
    mounts its file from that Secret. Every [[upstream]] is one of
    `upstreams`, its password_file and ca_file the Secret items named there, mounted into the
    origin container (never a password in the ConfigMap), and the agents' node-setup init
    container passes every upstream with mirrorOnNodes to `shoal node setup --registry`, with
    the upstream as the fallback server, each registry once."""
    import tomllib

    problems = []
    upstreams = []
    checked, values = values is not None, values or {}
    origin_secret = None
    for kind, name, key, text in config_files(by_kind):
        if key == "origin.toml":
            if kind != "Secret":
                problems.append(f"{kind}/{name}: origin.toml outside a Secret (it may hold passwords)")
                continue
            origin_secret = name
        try:
            parsed = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            problems.append(f"{kind}/{name}: {key} is not TOML: {e}")
            continue
        problems += [f"{key}: {f} is a float (Shoal's settings are integers)" for f in floats(parsed, "")]
        if key == "origin.toml":
            upstreams = parsed.get("upstream", [])
    origin = next((s for s in by_kind.get("StatefulSet", []) if s["metadata"]["name"].endswith("-origin")), None)
    spec = pod_spec(origin) if origin else {}
    container = next((c for c in spec.get("containers", []) if c["name"] == "origin"), {})
    if origin:
        config_arg = next((a.split("=", 1)[1] for a in container.get("args", []) if a.startswith("--config=")), None)
        source = file_source(spec, container, config_arg) if config_arg else "no --config"
        if origin_secret is None:
            problems.append("no Secret holds origin.toml")
        elif source != (origin_secret, "origin.toml"):
            problems.append(f"the origin's {config_arg} comes from {source}, not Secret {origin_secret}")
    want = {u["registry"]: u for u in values.get("upstreams", [])}
    if len({u.get("registry") for u in upstreams}) != len(upstreams):
        problems.append("origin.toml: a registry in two [[upstream]] sections (the origin keeps the last)")
    if checked and [u.get("registry") for u in upstreams] != list(want):
        problems.append(f"origin.toml upstreams {[u.get('registry') for u in upstreams]}, values {list(want)}")
    known = {"registry", "url", "username", "password_file", "ca_file", "tag_ttl", "serve_stale", "private_recheck"}
    for u in upstreams:
        name = u.get("registry")
        if set(u) - known:
            problems.append(f"upstream {name}: keys the origin refuses: {sorted(set(u) - known)}")
        v = want.get(name, {})
        if u.get("password"):
            problems.append(f"upstream {name}: a password in origin.toml (the chart mounts password_file)")
        if not checked:
            v = {"url": u.get("url"), "username": u.get("username"), "tagTtl": u.get("tag_ttl"),
                 "serveStale": u.get("serve_stale")}
        if u.get("url") != v.get("url"):
            problems.append(f"upstream {name}: url {u.get('url')!r}, values {v.get('url')!r}")
        for key, value in (("username", "username"), ("tag_ttl", "tagTtl"), ("serve_stale", "serveStale")):
            if u.get(key) != v.get(value):
                problems.append(f"upstream {name}: {key} {u.get(key)!r}, values {v.get(value)!r}")
        for key, value in (("password_file", "passwordSecret"), ("ca_file", "caSecret")):
            path, ref = u.get(key), v.get(value)
            if checked and bool(path) != bool(ref):
                problems.append(f"upstream {name}: {key} {path!r} but {value} {ref!r}")
            if not path:
                continue
            source = file_source(spec, container, path)
            if isinstance(source, str):
                problems.append(f"upstream {name}: {key} {source}")
            elif ref and source != (ref["name"], ref["key"]):
                problems.append(f"upstream {name}: {key} {path} comes from {source}, not {value} {ref}")

    # The registries the nodes' containerd sends to their agent.
    containerd = values.get("containerd", {})
    setup = [c for d in by_kind.get("DaemonSet", []) for c in pod_spec(d).get("initContainers", [])
             if c["name"] == "node-setup"]
    regs = [a.split("=", 1)[1] for c in setup for a in c.get("args", []) if a.startswith("--registry=")]
    mirrored = {}
    for r in ",".join(regs).split(",") if regs else []:
        name, _, server = r.partition("=")
        if name in mirrored:
            problems.append(f"node-setup: registry {name} given twice (shoal node setup refuses it)")
        mirrored[name] = server
    if checked and containerd.get("enabled", True):
        listed = {r["name"]: r.get("server") for r in containerd.get("extraRegistries", [])}
        for name, v in want.items():
            on_nodes = v.get("mirrorOnNodes", True)
            if name in listed:
                continue  # containerd.extraRegistries' entry, with its server
            if on_nodes and mirrored.get(name) != v["url"].rstrip("/"):
                problems.append(f"node-setup: upstream {name} mirrored as {mirrored.get(name)!r}, want {v['url'].rstrip('/')!r}")
            if not on_nodes and name in mirrored:
                problems.append(f"node-setup: upstream {name} has mirrorOnNodes false but the nodes mirror it")
    if upstreams:
        print(f"{len(upstreams)} upstreams checked, "
              f"{sum(1 for u in upstreams if u.get('registry') in mirrored)} mirrored on the nodes")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("rendered")
    ap.add_argument("--existing-secret", default=None)
    ap.add_argument("--values", action="append", default=[],
                    help="the chart's values.yaml, then each -f file of the rendering (in order)")
    args = ap.parse_args()
    values = None
    for f in args.values:
        values = merge(values or {}, yaml.safe_load(open(f)) or {})
    try:
        docs = [d for d in yaml.load_all(open(args.rendered), Loader=StrictLoader) if d]
    except yaml.YAMLError as e:
        print(f"{args.rendered}: {e}")
        print("0 objects, 1 problems")
        return 1
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
        pod_sc = spec.get("securityContext") or {}
        if (w["spec"].get("volumeClaimTemplates") and "fsGroup" in pod_sc
                and pod_sc.get("fsGroupChangePolicy") != "OnRootMismatch"):
            problems.append(f"{wname}: fsGroup without fsGroupChangePolicy OnRootMismatch (every start chowns the volume)")
        for t in spec.get("topologySpreadConstraints", []):
            tsel = t.get("labelSelector", {}).get("matchLabels", {})
            if not tsel or any(pod_labels(w).get(k) != v for k, v in tsel.items()):
                problems.append(f"{wname}: topologySpreadConstraint selector {tsel} does not select its own pods")
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

    problems += check_configs(by_kind, values)

    for p in problems:
        print(p)
    print(f"{len(docs)} objects, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
