#!/usr/bin/env bash
# The Helm chart renders to valid Kubernetes objects: `helm lint --strict` and `helm template`
# with the defaults and with each charts/shoal/ci/*-values.yaml (every option set; one origin),
# every object validated against Kubernetes 1.31's OpenAPI schemas in strict mode, then the
# wiring checks of integration/chart/check_rendered.py (no duplicate YAML key, selectors, named
# ports, references, security settings, origin.toml in a Secret, ServiceMonitor and
# PrometheusRule shape, dashboard JSON). Values the schema or the templates must refuse are
# refused. No cluster is involved: running what the chart renders is test_chart_run.sh.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
# shellcheck source=../chart/tools.sh source-path=SCRIPTDIR
source "$(dirname "$0")/../chart/tools.sh"
lib_init chart_render
chart=$(cd "$(dirname "$0")/../../charts/shoal" && pwd)
checker=$(cd "$(dirname "$0")/../chart" && pwd)/check_rendered.py

chart_tools || die "could not fetch helm and kubernetes-validate"
log "helm $("$HELM" version --short)"

render() { # NAME [helm args...]: lint and render into $T/NAME.yaml, validate, check wiring
  local name=$1 values=(--values "$chart/values.yaml") a prev=
  shift
  for a in "$@"; do # the checker compares the rendering with the values files (-f) too
    [[ $prev == -f ]] && values+=(--values "$a")
    prev=$a
  done
  "$HELM" lint --strict "$chart" "$@" >"$T/$name.lint" 2>&1 || { cat "$T/$name.lint" >&2; die "helm lint ($name) failed"; }
  "$HELM" template shoal "$chart" --namespace shoal "$@" >"$T/$name.yaml" 2>"$T/$name.err" ||
    { cat "$T/$name.err" >&2; die "helm template ($name) failed"; }
  "${KUBE_VALIDATE[@]}" "$T/$name.yaml" >"$T/$name.validate" 2>&1 || true
  if grep -E '^(ERROR|CRITICAL)' "$T/$name.validate" >&2 || ! grep -q 'passed for' "$T/$name.validate"; then
    cat "$T/$name.validate" >&2
    die "kubernetes-validate --strict refused the $name rendering"
  fi
  # The only objects without a bundled schema are the two prometheus-operator CRDs and
  # cert-manager's Certificate (check_rendered.py checks their shape).
  if grep WARN "$T/$name.validate" | grep -vE 'kind (ServiceMonitor|PrometheusRule|Certificate) ' >&2; then
    die "objects of the $name rendering were not validated"
  fi
  PYTHONPATH=$CHART_PYTHONPATH python3 "$checker" "$T/$name.yaml" --existing-secret shoal-cluster-secret "${values[@]}" >"$T/$name.check" ||
    { cat "$T/$name.check" >&2; die "wiring checks of the $name rendering failed"; }
  origin_toml "$T/$name.yaml" >"$T/$name.origin.toml" || die "$name: no origin.toml rendered"
  log "$name: $(grep -c '^kind:' "$T/$name.yaml") objects valid ($(tail -n1 "$T/$name.check"))"
}
origin_toml() { # RENDERED: the origin's config file, from the Secret that holds it
  PYTHONPATH=$CHART_PYTHONPATH python3 - "$1" <<'PY'
import base64, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "Secret" and "origin.toml" in d.get("data", {}):
        sys.stdout.write(base64.b64decode(d["data"]["origin.toml"]).decode())
        sys.exit(0)
sys.exit(1)
PY
}

render defaults
for f in "$chart"/ci/*-values.yaml; do
  render "$(basename "$f" -values.yaml)" -f "$f"
done
# TLS from Secrets made beforehand, cert-manager off: every component's Secret named.
render tls-own-secrets --set tls.enabled=true --set tls.certManager.enabled=false \
  --set tls.existingSecrets.origin=own-origin-tls --set tls.existingSecrets.tracker=own-tracker-tls \
  --set tls.existingSecrets.agent=own-agent-tls
# podSecurityContext merged into every pod's own settings: writing both out gave duplicate
# keys, which check_rendered.py's loader refuses. The user's value wins, the rest stays.
render pod-security --set podSecurityContext.runAsNonRoot=true --set podSecurityContext.fsGroup=1000
PYTHONPATH=$CHART_PYTHONPATH python3 - "$T/pod-security.yaml" <<'PY' || die "pod-security: podSecurityContext is not merged over the chart's settings"
import sys, yaml
pods = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in yaml.safe_load_all(open(sys.argv[1]))
        if d and d["kind"] in ("StatefulSet", "DaemonSet", "Job")}
for name in ("shoal-origin", "shoal-tracker", "shoal-agent", "shoal-restore", "shoal-restore-wait"):
    sc = pods[name]["securityContext"]
    assert sc["fsGroup"] == 1000 and sc["runAsNonRoot"] is True, (name, sc)
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (name, sc)
for name in ("shoal-origin", "shoal-tracker", "shoal-restore-wait"):
    assert pods[name]["securityContext"]["runAsUser"] == 65532, name
assert pods["shoal-origin"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
PY
# A listen address of "::" is bracketed: --listen=:::5000 does not parse.
render ipv6 --set origin.listenAddress=:: --set tracker.listenAddress=:: --set agent.listenAddress=:: -f "$chart/ci/tls-values.yaml"
if grep -E -- '-listen=[^[]*::' "$T/ipv6.yaml" >&2; then die "ipv6: an IPv6 listen address without brackets"; fi
for a in '--listen=\[::\]:5000' '--peer-listen=\[::\]:7001' '--internal-listen=\[::\]:6443' '--listen=\[::\]:5100'; do
  grep -q -- "$a" "$T/ipv6.yaml" || die "ipv6: no $a"
done

# What the renderings must contain.
grep -q '^kind: ServiceMonitor' "$T/all-on.yaml" || die "metrics.serviceMonitor.enabled rendered no ServiceMonitor"
grep -q '^kind: PrometheusRule' "$T/all-on.yaml" || die "metrics.prometheusRule.enabled rendered no PrometheusRule"
grep -q 'grafana_dashboard: "1"' "$T/all-on.yaml" || die "the dashboard ConfigMap lacks the sidecar label"
grep -q 'name: shoal-cluster-secret' "$T/all-on.yaml" || die "an existing Secret is not used"
objects() { # RENDERED: Kind/name of every object
  PYTHONPATH=$CHART_PYTHONPATH python3 -c '
import sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d:
        print(d["kind"] + "/" + d["metadata"]["name"])' "$1"
}
if grep -qx 'Secret/reg-cluster' <<<"$(objects "$T/all-on.yaml")"; then
  die "a cluster Secret was generated although an existing one was named"
fi
grep -qx 'Secret/shoal-cluster' <<<"$(objects "$T/defaults.yaml")" || die "no cluster Secret generated by default"
grep -q 'helm.sh/hook: post-delete' "$T/defaults.yaml" || die "no post-delete hook restores containerd's config"
if grep -q 'helm.sh/hook' "$T/one-origin.yaml"; then die "containerd.enabled=false still renders the restore hook"; fi
if grep -q -- '--hosts-dir' "$T/one-origin.yaml"; then die "containerd.enabled=false still writes hosts.toml"; fi
grep -q -- '--registry=registry.example.com,docker.io,ghcr.io=https://ghcr.io' "$T/all-on.yaml" ||
  die "the mirrored registries are not passed to shoal node setup"
# The origin's volume is chowned only when its root does not match (check_rendered.py checks
# every fsGroup has the policy; this that the origin keeps its fsGroup and the policy).
grep -q 'fsGroupChangePolicy: OnRootMismatch' "$T/defaults.yaml" || die "the origin volume is chowned on every start"
# agent.priorityClassQuota.create: a quota scoped to the agents' PriorityClass, and one more
# for the post-delete hook (the release's is gone by then).
[[ $(grep -c '^kind: ResourceQuota' "$T/all-on.yaml") == 2 ]] || die "all-on: want the agents' and the hook's ResourceQuota"
grep -A3 'scopeName: PriorityClass' "$T/all-on.yaml" | grep -q 'values: \["system-node-critical"\]' ||
  die "all-on: the ResourceQuota is not scoped to the agents' PriorityClass"
if grep -q '^kind: ResourceQuota' "$T/defaults.yaml"; then die "a ResourceQuota without agent.priorityClassQuota.create"; fi

# Upstreams (check_rendered.py compares each rendering with its values: [[upstream]]
# sections, the password and CA files from the Secrets named, the registries the nodes mirror).
# all-on: docker.io stays containerd.extraRegistries' entry (listed once), mirror.example.org
# is added with its url as the fallback server, quay.io (mirrorOnNodes: false) is not.
regs=$(grep -o -- '--registry=[^"]*' "$T/all-on.yaml" | head -n 1)
[[ $regs == --registry=registry.example.com,docker.io,ghcr.io=https://ghcr.io,mirror.example.org=https://mirror.example.org ]] ||
  die "all-on: the nodes mirror $regs"
grep -q '^3 upstreams checked, 2 mirrored on the nodes' "$T/all-on.check" ||
  die "all-on: the upstreams were not checked: $(cat "$T/all-on.check")"
grep -q '^2 upstreams checked, 2 mirrored on the nodes' "$T/upstream.check" ||
  die "upstream: the upstreams were not checked: $(cat "$T/upstream.check")"
grep -q 'password_file = "/var/run/shoal-upstream/registry.corp.example/password"' "$T/upstream.origin.toml" ||
  die "upstream: no password_file for registry.corp.example"
grep -q '^  max_concurrent_requests = 512$' "$T/upstream.origin.toml" || die "upstream: origin.config's integer is not an integer"

# origin.config may hold passwords and cluster secrets: never in a ConfigMap (the `view` role
# reads those), only in the origin's config Secret.
"$HELM" template shoal "$chart" --namespace shoal --set 'origin.config.cluster.accepted_secrets[0]=old-secret-8d2f1c' \
  --set 'origin.config.auth.users[0].name=ci' --set 'origin.config.auth.users[0].password=pw-5e7a91b3' \
  >"$T/secrets.yaml" || die "helm template with origin.config secrets failed"
PYTHONPATH=$CHART_PYTHONPATH python3 - "$T/secrets.yaml" <<'PY' || die "a secret of origin.config is in a ConfigMap"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    if d["kind"] == "ConfigMap":
        text = yaml.safe_dump(d)
        for secret in ("old-secret-8d2f1c", "pw-5e7a91b3"):
            assert secret not in text, f"ConfigMap/{d['metadata']['name']} holds {secret}"
PY
origin_toml "$T/secrets.yaml" >"$T/secrets.origin.toml" || die "no origin.toml Secret rendered"
grep -q 'old-secret-8d2f1c' "$T/secrets.origin.toml" || die "cluster.accepted_secrets is not in the origin's config Secret"
grep -q 'pw-5e7a91b3' "$T/secrets.origin.toml" || die "auth.users' password is not in the origin's config Secret"

# Each component's pods restart on a change of its own config only: one checksum over the
# whole ConfigMap rolled every node's agent for an origin setting, and the origins for an
# agent's.
config_checksums() { # helm-args...: "<agents' checksum> <origins' checksum>" (run in $(...))
  "$HELM" template shoal "$chart" --namespace shoal "$@" >"$T/checksums.yaml" 2>"$T/checksums.err" ||
    { cat "$T/checksums.err" >&2; echo "helm template $* failed"; return 1; }
  PYTHONPATH=$CHART_PYTHONPATH python3 - "$T/checksums.yaml" <<'PY'
import sys, yaml
sums = {}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc.get("kind") in ("DaemonSet", "StatefulSet"):
        meta = doc["spec"]["template"]["metadata"]
        component = meta["labels"].get("app.kubernetes.io/component")
        if component in ("agent", "origin"):
            sums[component] = meta["annotations"]["checksum/config"]
print(sums["agent"], sums["origin"])
PY
}
sums=$(config_checksums) || die "$sums"
read -r agent0 origin0 <<<"$sums"
sums=$(config_checksums --set origin.config.limits.drain_delay=9s) || die "$sums"
read -r agent1 origin1 <<<"$sums"
[[ $agent1 == "$agent0" ]] || die "an origin setting changes the agents' pod template (every node's agent restarts)"
[[ $origin1 != "$origin0" ]] || die "an origin setting does not restart the origins"
sums=$(config_checksums --set agent.config.cache_low_watermark=15GiB) || die "$sums"
read -r agent2 origin2 <<<"$sums"
[[ $origin2 == "$origin0" ]] || die "an agent setting changes the origins' pod template"
[[ $agent2 != "$agent0" ]] || die "an agent setting does not restart the agents"
log "config checksums: each component restarts on its own settings only"
# The uninstall's wait Job runs where the origins may (all-on taints their pool).
PYTHONPATH=$CHART_PYTHONPATH python3 - "$T/all-on.yaml" <<'PY' || die "all-on: the restore-wait Job lacks the origins' tolerations"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
def pod(kind, component):
    for d in docs:
        if d["kind"] == kind and d["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == component:
            return d["spec"]["template"]["spec"]
origin, wait = pod("StatefulSet", "origin"), pod("Job", "restore-wait")
assert origin.get("tolerations"), "all-on sets origin tolerations"
assert wait.get("tolerations") == origin["tolerations"], wait.get("tolerations")
assert wait.get("nodeSelector") == origin.get("nodeSelector"), wait.get("nodeSelector")
PY

# Values the schema (or the templates) must refuse, each with a message naming the problem.
refuse() { # WHAT PATTERN helm-args...
  local what=$1 pattern=$2
  shift 2
  if "$HELM" template shoal "$chart" "$@" >/dev/null 2>"$T/refuse.err"; then die "accepted $what"; fi
  grep -q "$pattern" "$T/refuse.err" || { cat "$T/refuse.err" >&2; die "refused $what without naming it"; }
}
refuse "an unknown key" "bogus" --set origin.bogus=1
refuse "R above the origin count" "replicationFactor" --set origin.replicas=1
refuse "a relative hostPath" "hostPath" --set agent.hostPath=var/lib
refuse "a port out of range" "port" --set agent.port=70000
refuse "no agent down at once in a rollout" "maxUnavailable" --set agent.updateStrategy.maxUnavailable=0
refuse "0 % of the agents down at once" "maxUnavailable" --set agent.updateStrategy.maxUnavailable=0%
refuse "a bad registry name" "registryName" --set containerd.registryName=http://x/y
refuse "an upstream with a port" "registry" --set 'upstreams[0].registry=host:5000' --set 'upstreams[0].url=https://h'
refuse "an upstream in upper case" "registry" --set 'upstreams[0].registry=Docker.io' --set 'upstreams[0].url=https://h'
refuse "an upstream without a url" "url" --set 'upstreams[0].registry=docker.io'
refuse "an upstream url that is not http(s)" "url" --set 'upstreams[0].registry=docker.io' --set 'upstreams[0].url=ftp://h'
refuse "an upstream user without a password" "passwordSecret" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].username=u'
refuse "upstreams inside origin.config" "upstreams" --set 'origin.config.upstream[0].registry=docker.io'
refuse "an upstream url with a path" "url" --set 'upstreams[0].registry=docker.io' --set 'upstreams[0].url=https://h/v2'
refuse "an upstream url with a comma" "url" --set-json 'upstreams=[{"registry":"docker.io","url":"https://h,i"}]'
refuse "an upstream without a registry" "registry" --set 'upstreams[0].url=https://h'
refuse "an upstream registry with a path" "registry" --set 'upstreams[0].registry=docker.io/library' --set 'upstreams[0].url=https://h'
refuse "an upstream password Secret without a user" "username" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].passwordSecret.name=s' --set 'upstreams[0].passwordSecret.key=p'
refuse "an upstream CA Secret without a key" "key" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].caSecret.name=corp-ca'
refuse "an upstream's tag TTL without a unit" "tagTtl" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].tagTtl=30'
refuse "an upstream password inline" "password" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].password=hunter2'
refuse "an upstream listed twice" "docker.io.*twice" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[1].registry=docker.io' --set 'upstreams[1].url=https://i'
refuse "an upstream named like the origins' registry" "registryName" --set containerd.registryName=registry.example.com \
  --set 'upstreams[0].registry=registry.example.com' --set 'upstreams[0].url=https://h'
refuse "cert-manager without an issuer" "name" --set tls.enabled=true
refuse "TLS without cert-manager or certificate Secrets" \
  "tls.existingSecrets.origin, tls.existingSecrets.tracker, tls.existingSecrets.agent" \
  --set tls.enabled=true --set tls.certManager.enabled=false
refuse "TLS without cert-manager, the agents' Secret missing" "set tls.existingSecrets.agent " \
  --set tls.enabled=true --set tls.certManager.enabled=false \
  --set tls.existingSecrets.origin=o --set tls.existingSecrets.tracker=t
refuse "a priority quota without a PriorityClass" "agent.priorityClassName" \
  --set agent.priorityClassQuota.create=true --set agent.priorityClassName=
refuse "an extra registry named like the origins' registry" "extraRegistries.*twice" \
  --set containerd.registryName=reg.example.com --set 'containerd.extraRegistries[0].name=reg.example.com'
refuse "an extra registry listed twice" "extraRegistries\\[1\\].*twice" \
  --set 'containerd.extraRegistries[0].name=ghcr.io' --set 'containerd.extraRegistries[1].name=ghcr.io'
refuse "a dial timeout shorter than 1ms" "dialTimeout" --set containerd.dialTimeout=500us
refuse "a dial timeout of zero" "dialTimeout" --set containerd.dialTimeout=0ms
refuse "containerd's config_path list" "configPath" \
  --set 'containerd.configPath=/etc/containerd/certs.d:/etc/docker/certs.d'
refuse "an upstream's private recheck of zero" "privateRecheck" --set 'upstreams[0].registry=docker.io' \
  --set 'upstreams[0].url=https://h' --set 'upstreams[0].privateRecheck=0s'
# Keys the chart passes by flags (or the environment), which override the config file.
refuse "cluster.replicas in origin.config" "origin.config.cluster.replicas.*origin.replicationFactor" \
  --set origin.config.cluster.replicas=3
refuse "listen in origin.config" "origin.config.listen.*origin.port" --set origin.config.listen=0.0.0.0:6000
refuse "data_dir in origin.config" "origin.config.data_dir.*origin.persistence" --set origin.config.data_dir=/data
refuse "cluster.members in origin.config" "origin.config.cluster.members.*origin.replicas" \
  --set 'origin.config.cluster.members[0]=a:5000'
refuse "cluster.internal_listen in origin.config" "origin.config.cluster.internal_listen.*tls.internalPort" \
  --set origin.config.cluster.internal_listen=0.0.0.0:5443
refuse "cluster.secret in origin.config" "origin.config.cluster.secret.*clusterSecret.existingSecret" \
  --set origin.config.cluster.secret=s
refuse "tls.cert in origin.config" "origin.config.tls.cert.*tls.enabled" --set origin.config.tls.cert=/c.pem
refuse "data_dir in agent.config" "agent.config.data_dir.*agent.hostPath" --set agent.config.data_dir=/data
# Two listeners of one process on one port: the pods crash at start.
refuse "tls.internalPort equal to origin.port" "origin.port and tls.internalPort are both 5000" \
  -f "$chart/ci/tls-values.yaml" --set tls.internalPort=5000
refuse "origin.peerPort equal to origin.port" "origin.port and origin.peerPort" --set origin.peerPort=5000
refuse "agent.port equal to agent.peerPort" "agent.port and agent.peerPort are both 7001" --set agent.port=7001
# Renewal at a quarter of the life left or later warns in every pod (and pages under 7 days).
refuse "renewBefore under a quarter of duration" "renewBefore 120h is less than a quarter" \
  -f "$chart/ci/tls-values.yaml" --set tls.certManager.renewBefore=120h
refuse "renewBefore under a quarter, in mixed units" "renewBefore 22h29m is less than a quarter" \
  -f "$chart/ci/tls-values.yaml" --set tls.certManager.duration=90h --set tls.certManager.renewBefore=22h29m
refuse "renewBefore within the certificate alert's 7 days" "more than 169h" -f "$chart/ci/tls-values.yaml" \
  --set metrics.prometheusRule.enabled=true --set tls.certManager.duration=600h --set tls.certManager.renewBefore=169h
"$HELM" template shoal "$chart" -f "$chart/ci/tls-values.yaml" --set metrics.prometheusRule.enabled=true >/dev/null ||
  die "the TLS example with alerts is refused"
"$HELM" template shoal "$chart" -f "$chart/ci/tls-values.yaml" --set tls.certManager.duration=90h \
  --set tls.certManager.renewBefore=22h30m >/dev/null || die "renewBefore of exactly a quarter (22h30m of 90h) is refused"

# The origins spread over nodes: with R = 2, two on one node lose blobs with it.
spread() { # RENDERED: the origins' topologySpreadConstraints as JSON
  PYTHONPATH=$CHART_PYTHONPATH python3 -c '
import json, sys, yaml
for d in yaml.safe_load_all(open(sys.argv[1])):
    if d and d["kind"] == "StatefulSet" and d["metadata"]["name"].endswith("-origin"):
        print(json.dumps(d["spec"]["template"]["spec"].get("topologySpreadConstraints", []), sort_keys=True))' "$1"
}
want='[{"labelSelector": {"matchLabels": {"app.kubernetes.io/component": "origin", "app.kubernetes.io/instance": "shoal", "app.kubernetes.io/name": "shoal"}}, "maxSkew": 1, "nodeTaintsPolicy": "Honor", "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}]'
[[ $(spread "$T/defaults.yaml") == "$want" ]] || die "defaults: the origins are not spread over nodes: $(spread "$T/defaults.yaml")"
"$HELM" template shoal "$chart" --set origin.topologySpread.whenUnsatisfiable=DoNotSchedule >"$T/spread.yaml"
[[ $(spread "$T/spread.yaml") == *'"whenUnsatisfiable": "DoNotSchedule"'* ]] || die "origin.topologySpread.whenUnsatisfiable is not rendered"
"$HELM" template shoal "$chart" --set origin.topologySpread.enabled=false >"$T/spread.yaml"
[[ $(spread "$T/spread.yaml") == "[]" ]] || die "origin.topologySpread.enabled=false still spreads"
refuse "a spread that is neither DoNotSchedule nor ScheduleAnyway" "whenUnsatisfiable" \
  --set origin.topologySpread.whenUnsatisfiable=Never

# TLS: certificates from cert-manager where no Secret is named, https everywhere, the
# origins' internal listener as their member address, containerd trusting the agent's CA.
t=$T/tls.yaml
[[ $(grep -c '^kind: Certificate' "$t") == 2 ]] || die "tls: want Certificates for the origin and the tracker only"
grep -q 'organizationalUnits: \[shoal-origin\]' "$t" || die "tls: the origin certificate has no role"
# Every name docs/kubernetes.md tells users to push to.
for n in shoal-origin.shoal.svc.cluster.local shoal-origin.shoal.svc shoal-origin.shoal shoal-origin; do
  grep -q -- "^    - \"$n\"$" "$t" || die "tls: the origin certificate does not name $n"
done
grep -q 'private_recheck = "10m"' "$T/upstream.origin.toml" || die "upstream: privateRecheck is not rendered"
grep -q 'secretName: shoal-agent-tls-made-by-hand' "$t" || die "tls: the agents' own Secret is not mounted"
grep -q -- '--internal-listen=0.0.0.0:6443' "$t" || die "tls: no internal listener"
grep -q -- '--cluster=shoal-origin-0.shoal-origin-headless.shoal.svc.cluster.local:6443,' "$t" ||
  die "tls: members are not listed by their internal port"
grep -q -- '--origin=https://shoal-origin-0.shoal-origin-headless.shoal.svc.cluster.local:5000,' "$t" ||
  die "tls: agents and trackers do not reach origins over https"
grep -q -- '--mirror=https://127.0.0.1:5000' "$t" || die "tls: containerd's mirror is not https"
grep -q -- '--mirror-ca=/etc/shoal-tls/ca.crt' "$t" || die "tls: containerd is not given the CA"
grep -q 'scheme: HTTPS' "$t" || die "tls: probes do not use https"
if grep -q -- '--tls-cert' "$T/defaults.yaml"; then die "TLS flags without tls.enabled"; fi
t=$T/tls-own-secrets.yaml
if grep -q '^kind: Certificate' "$t"; then die "tls-own-secrets: Certificates without cert-manager"; fi
for c in origin tracker agent; do
  grep -q "secretName: own-$c-tls" "$t" || die "tls-own-secrets: the $c Secret is not mounted"
done

# NOTES.txt (helm template does not render it: a copy of the chart renders it as a value).
notes() { # NAME [helm args...]: the NOTES of that install into $T/NAME.notes
  local name=$1
  shift
  rm -rf "$T/notes-chart" && cp -r "$chart" "$T/notes-chart"
  cp "$chart/templates/NOTES.txt" "$T/notes-chart/notes.txt"
  printf '%s\n' 'notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}' >"$T/notes-chart/templates/zz-notes.yaml"
  "$HELM" template shoal "$T/notes-chart" --namespace shoal --show-only templates/zz-notes.yaml "$@" |
    PYTHONPATH=$CHART_PYTHONPATH python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["notes"])' >"$T/$name.notes" ||
    die "NOTES.txt ($name) did not render"
}
notes plain
notes tls -f "$chart/ci/tls-values.yaml"
grep -q 'http://127.0.0.1:5000/shoal/v1/admin/gc' "$T/plain.notes" || die "NOTES: no plain GC command"
if grep -q 'https' "$T/plain.notes"; then die "NOTES: https without tls.enabled"; fi
# With TLS the admin API is only on the internal listener, behind a cluster certificate.
grep -q 'port-forward pod/shoal-origin-0 6443:6443' "$T/tls.notes" || die "NOTES (tls): no port-forward to the internal port"
grep -q -- '--cert origin.crt --key origin.key https://127.0.0.1:6443/shoal/v1/admin/gc' "$T/tls.notes" ||
  die "NOTES (tls): GC is not sent to the internal listener with a certificate"
grep -q "get secret shoal-origin-tls -o jsonpath='{.data.tls\\\\.key}'" "$T/tls.notes" ||
  die "NOTES (tls): the certificate does not come from the origin's Secret"
if grep -q 'http://' "$T/tls.notes"; then die "NOTES (tls): a plain http:// command"; fi
log "schema refuses bad values"
