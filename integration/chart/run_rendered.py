#!/usr/bin/env python3
"""Run what the Helm chart renders, without Kubernetes, to prove its wiring.

No control plane can run here, so this plays kubelet for the rendered objects:

- every pod of the origin and tracker StatefulSets gets its own network namespace and address
  on a private bridge (10.79.0.0/24); every node is a namespace too, and the agent DaemonSet's
  pods run on the node's network (the chart sets hostNetwork);
- the names the chart uses (StatefulSet pods under their headless Services, Services) resolve
  through /etc/netns/NS/hosts, as cluster DNS would answer them;
- each container's args and env are taken from the rendering: downward-API fields filled in
  (pod name and IP, node name and IP, namespace), `secretKeyRef` read from the rendered Secret,
  `$(VAR)` expanded as Kubernetes does; volumes become directories (PVCs and emptyDirs per pod,
  hostPaths per node, ConfigMaps written out) and paths in args are mapped onto them; each
  container runs as its securityContext's user (setpriv), a root one with only the
  capabilities its securityContext leaves it (setpriv's bounding set), init containers first;
- pods are ready when their rendered readinessProbe answers.

Then, as a user would: push an image to the origin Service's name, `ctr images pull` it on two
nodes through the hosts.toml the init container wrote (containerd never restarted), check from
the agents' metrics that the second node got bytes from the first, check that every metric name
the chart's alerts and dashboard use is exported, then uninstall: stop everything, run the
post-delete hook (restore DaemonSet on every node, then the wait Job against its headless
Service) and check each node's containerd config directory is byte-for-byte as before.

    run_rendered.py --rendered R.yaml --metrics-rendered M.yaml --shoal BIN --workdir DIR
                    --layout OCI_LAYOUT --tag TAG [--nodes 2]
"""
import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import yaml

# Private addresses that exist only inside this test's namespaces.
SUBNET = "10.79.0"
# How long a pod may take to become ready.
READY_TIMEOUT_S = 90
# How long a pull may take.
PULL_TIMEOUT_S = 180


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} chart_run] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


def run(cmd, timeout=60, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise Failure(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


class Cluster:
    """Namespaces, processes and files this run created, removed in reverse at the end."""

    def __init__(self, workdir, shoal):
        self.workdir = workdir
        self.prefix = f"sc{os.getpid() % 100000}"
        self.bridge_ns = f"{self.prefix}br"
        self.namespaces = []
        self.procs = []  # (name, Popen, log path)
        self.next_ip = 10
        self.hosts = {}  # name -> [ip]
        self.shoal = shoal
        run(["ip", "netns", "add", self.bridge_ns])
        self.namespaces.append(self.bridge_ns)
        br = ["ip", "netns", "exec", self.bridge_ns]
        run(br + ["ip", "link", "add", "br0", "type", "bridge"])
        run(br + ["ip", "link", "set", "br0", "up"])
        run(br + ["ip", "link", "set", "lo", "up"])

    def add_host(self, short):
        """A namespace with one address on the bridge; returns (netns name, ip)."""
        ns = f"{self.prefix}{short}"
        ip = f"{SUBNET}.{self.next_ip}"
        self.next_ip += 1
        run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        # No resolver: every name the chart uses must come from the hosts file.
        with open(f"/etc/netns/{ns}/resolv.conf", "w") as f:
            f.write("# chart run: names come from /etc/hosts only\n")
        outer, inner = f"{ns}a", f"{ns}b"
        run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner])
        run(["ip", "link", "set", outer, "netns", self.bridge_ns])
        run(["ip", "link", "set", inner, "netns", ns])
        b = ["ip", "netns", "exec", self.bridge_ns]
        run(b + ["ip", "link", "set", outer, "master", "br0"])
        run(b + ["ip", "link", "set", outer, "up"])
        n = ["ip", "netns", "exec", ns]
        run(n + ["ip", "link", "set", inner, "name", "eth0"])
        run(n + ["ip", "addr", "add", f"{ip}/24", "dev", "eth0"])
        run(n + ["ip", "link", "set", "eth0", "up"])
        run(n + ["ip", "link", "set", "lo", "up"])
        return ns, ip

    def resolve(self, name, ip):
        self.hosts.setdefault(name, [])
        if ip not in self.hosts[name]:
            self.hosts[name].append(ip)

    def write_hosts(self):
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        for name, ips in sorted(self.hosts.items()):
            lines += [f"{ip} {name}" for ip in ips]
        for ns in self.namespaces:
            if ns == self.bridge_ns:
                continue
            with open(f"/etc/netns/{ns}/hosts", "w") as f:
                f.write("\n".join(lines) + "\n")

    def start(self, name, ns, argv, env, user, log_path, caps=None):
        cmd = ["ip", "netns", "exec", ns]
        if user is not None and user != 0:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        elif caps is not None:
            # A root container keeps only the capabilities its securityContext leaves it
            # (what it gets on exec is the bounding set): without CAP_DAC_OVERRIDE root is
            # held to permission bits like anyone else.
            cmd += ["setpriv", f"--bounding-set={caps}", "--inh-caps=-all"]
        cmd += argv
        logf = open(log_path, "w")
        p = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p, log_path))
        return p

    def stop(self, p, timeout=15):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def teardown(self):
        for _, p, _ in reversed(self.procs):
            self.stop(p, timeout=10)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def dump_logs(self, lines=30):
        for name, _, path in self.procs:
            try:
                tail = open(path).read().splitlines()[-lines:]
            except OSError:
                continue
            print(f"----- last {lines} lines of {name} ({path}) -----", file=sys.stderr)
            print("\n".join(tail), file=sys.stderr)


class Pod:
    """One pod of a rendered workload, placed on a node."""

    def __init__(self, workload, name, node, ns, ip, host_ip, cluster, objects, workdir):
        self.workload = workload
        self.spec = workload["spec"]["template"]["spec"]
        self.name = name
        self.node = node
        self.ns = ns
        self.ip = ip
        self.host_ip = host_ip
        self.cluster = cluster
        self.objects = objects
        self.dir = os.path.join(workdir, "pods", name)
        os.makedirs(self.dir, exist_ok=True)
        self.mounts = self._volumes(workdir)

    def _files(self, name, files):
        """A directory of this pod's holding `files` (name -> bytes), as a ConfigMap or
        Secret volume shows them: one file each, mode 0644."""
        d = os.path.join(self.dir, name)
        os.makedirs(d, exist_ok=True)
        for key, data in files.items():
            with open(os.path.join(d, key), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(d, key), 0o644)
        return d

    def _volumes(self, workdir):
        """Volume name -> host directory, as kubelet would provide them."""
        out = {}
        fs_group = self.spec.get("securityContext", {}).get("fsGroup")
        claims = [c["metadata"]["name"] for c in self.workload["spec"].get("volumeClaimTemplates", [])]
        for claim in claims:
            d = os.path.join(self.dir, f"pvc-{claim}")
            os.makedirs(d, exist_ok=True)
            if fs_group is not None:
                os.chown(d, 0, fs_group)
                os.chmod(d, 0o2775)
            out[claim] = d
        for v in self.spec.get("volumes", []):
            if "emptyDir" in v:
                d = os.path.join(self.dir, f"empty-{v['name']}")
                os.makedirs(d, exist_ok=True)
                os.chmod(d, 0o1777)
            elif "hostPath" in v:
                d = os.path.join(workdir, "nodes", self.node, "root") + v["hostPath"]["path"]
                if v["hostPath"].get("type") == "DirectoryOrCreate":
                    os.makedirs(d, exist_ok=True)
            elif "configMap" in v:
                cm = self.objects[("ConfigMap", v["configMap"]["name"])]
                files = {k: t.encode() for k, t in cm.get("data", {}).items()}
                d = self._files(f"cm-{v['name']}", files)
            elif "secret" in v:
                secret = self.objects[("Secret", v["secret"]["secretName"])]
                files = {k: base64.b64decode(b) for k, b in secret.get("data", {}).items()}
                d = self._files(f"secret-{v['name']}", files)
            else:
                raise Failure(f"{self.name}: volume kind not emulated: {v}")
            out[v["name"]] = d
        return out

    def field(self, path):
        return {
            "metadata.name": self.name,
            "metadata.namespace": self.workload["metadata"].get("namespace", NAMESPACE),
            "status.podIP": self.ip,
            "status.hostIP": self.host_ip,
            "spec.nodeName": self.node,
        }[path]

    def env(self, c):
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent"}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(str(e["value"]), env)
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = self.field(e["valueFrom"]["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                secret = self.objects[("Secret", ref["name"])]
                env[e["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                raise Failure(f"{self.name}: env source not emulated: {e}")
        return env

    def argv(self, c, env):
        """The container's command line with paths mapped onto this pod's volumes."""
        if c.get("command"):
            cmd = [expand(a, env) for a in c["command"]]
            if cmd[0] != IMAGE_ENTRYPOINT:
                raise Failure(f"{self.name}/{c['name']}: command {cmd[0]} is not the image's shoal")
            args = cmd[1:] + [expand(a, env) for a in c.get("args", [])]
        else:
            args = [expand(a, env) for a in c.get("args", [])]
        mounts = sorted(((m["mountPath"], self.mounts[m["name"]]) for m in c.get("volumeMounts", [])),
                        key=lambda m: -len(m[0]))
        if not mounts:
            return [self.cluster.shoal] + args
        # One pass, longest mount path first, so a mapped path is never mapped again.
        hosts = dict(mounts)
        pattern = re.compile(r"(^|=|,)(" + "|".join(re.escape(m) for m, _ in mounts) + r")(?=/|$|,)")
        return [self.cluster.shoal] + [pattern.sub(lambda m: m.group(1) + hosts[m.group(2)], a) for a in args]

    def user(self, c):
        sc = c.get("securityContext", {})
        return sc.get("runAsUser", self.spec.get("securityContext", {}).get("runAsUser"))

    @staticmethod
    def caps(c):
        """setpriv's --bounding-set for a container's securityContext.capabilities, or None."""
        caps = c.get("securityContext", {}).get("capabilities")
        if not caps:
            return None
        drop = [d.lower() for d in caps.get("drop", [])]
        add = [a.lower() for a in caps.get("add", [])]
        if "all" in drop:
            return ",".join(["-all"] + [f"+{a}" for a in add])
        return ",".join([f"-{d}" for d in drop] + [f"+{a}" for a in add]) or None

    def run_init(self):
        for c in self.spec.get("initContainers", []):
            env = self.env(c)
            argv = self.argv(c, env)
            log_path = os.path.join(self.dir, f"{c['name']}.log")
            p = self.cluster.start(f"{self.name}/{c['name']}", self.ns, argv, env, self.user(c), log_path,
                                   self.caps(c))
            if p.wait(60) != 0:
                raise Failure(f"init container {self.name}/{c['name']} failed: {open(log_path).read()[-2000:]}")
            log(f"{self.name}: init container {c['name']} done")

    def start(self):
        self.procs = []
        for c in self.spec["containers"]:
            env = self.env(c)
            argv = self.argv(c, env)
            log_path = os.path.join(self.dir, f"{c['name']}.log")
            self.procs.append((c, self.cluster.start(f"{self.name}/{c['name']}", self.ns, argv, env, self.user(c),
                                                     log_path, self.caps(c))))

    def probe_ok(self, c):
        probe = c.get("readinessProbe", {}).get("httpGet")
        if not probe:
            return True
        port = probe["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in c["ports"] if p.get("name") == port)
        url = f"http://{self.ip}:{port}{probe['path']}"
        r = subprocess.run(["ip", "netns", "exec", self.ns, "curl", "-sf", "-o", "/dev/null", "-m", "2", url],
                           capture_output=True, timeout=10)
        return r.returncode == 0

    def wait_ready(self, deadline):
        for c, p in self.procs:
            while not self.probe_ok(c):
                if p.poll() is not None:
                    raise Failure(f"{self.name}/{c['name']} exited with {p.returncode}")
                if time.time() > deadline:
                    raise Failure(f"{self.name}/{c['name']} not ready after {READY_TIMEOUT_S}s")
                time.sleep(0.3)

    def url(self, port_name="http"):
        c = self.spec["containers"][0]
        port = next(p["containerPort"] for p in c["ports"] if p.get("name") == port_name)
        return f"http://{self.ip}:{port}"


NAMESPACE = "shoal"
IMAGE_ENTRYPOINT = "/usr/local/bin/shoal"


def expand(s, env):
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes."""
    def sub(m):
        if m.group(0).startswith("$$"):
            return m.group(0)[1:]
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$\(|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)


def in_ns(ns, url, timeout=5):
    r = subprocess.run(["ip", "netns", "exec", ns, "curl", "-sf", "-m", str(timeout), url],
                       capture_output=True, text=True, timeout=timeout + 5)
    if r.returncode != 0:
        raise Failure(f"GET {url} in {ns} failed: {r.stderr.strip()}")
    return r.stdout


def metrics(ns, url):
    """name{labels} -> value, and the set of metric family names."""
    samples = {}
    for line in in_ns(ns, url + "/metrics").splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


def family_names(samples):
    return {re.sub(r"\{.*", "", k) for k in samples}


def metric_sum(samples, name, match=""):
    return sum(v for k, v in samples.items() if re.sub(r"\{.*", "", k) == name and match in k)


def snapshot(root):
    """Every directory and file (with its bytes) under root."""
    out = {}
    for d, dirs, files in os.walk(root):
        rel = os.path.relpath(d, root)
        out[rel + "/"] = None
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.join(rel, f)] = fh.read()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rendered", required=True)
    ap.add_argument("--metrics-rendered", required=True)
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layout", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(open(args.rendered)) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    hooks = [d for d in docs if "helm.sh/hook" in d["metadata"].get("annotations", {})]
    installed = [d for d in docs if d not in hooks]
    workdir = args.workdir
    os.chmod(workdir, 0o755)
    # The binary where any container user can run it.
    shoal = os.path.join(workdir, "shoal")
    shutil.copy(args.shoal, shoal)
    os.chmod(shoal, 0o755)

    cluster = Cluster(workdir, shoal)
    ok = False
    try:
        ok = scenario(args, cluster, objects, installed, hooks, workdir)
    except (Failure, subprocess.TimeoutExpired) as e:
        log(f"FAIL: {e}")
        cluster.dump_logs()
    finally:
        cluster.teardown()
    return 0 if ok else 1


def scenario(args, cluster, objects, installed, hooks, workdir):
    svc_suffix = f"{NAMESPACE}.svc.cluster.local"
    by_kind = {}
    for d in installed:
        by_kind.setdefault(d["kind"], []).append(d)
    unsupported = {k for k in by_kind} - {"StatefulSet", "DaemonSet", "Service", "ConfigMap", "Secret",
                                          "ServiceAccount", "PodDisruptionBudget"}
    if unsupported:
        raise Failure(f"objects this runner does not emulate: {unsupported}")

    # Nodes: namespaces whose network the agents (hostNetwork) share.
    nodes = []
    for i in range(args.nodes):
        ns, ip = cluster.add_host(f"n{i}")
        nodes.append((f"node-{i}", ns, ip))

    # The nodes' containerd configuration as the user had it before the chart: one registry
    # the chart will mirror (docker.io, backed up and restored) and one it leaves alone.
    hosts_dirs = {}
    ds = by_kind["DaemonSet"][0]
    cfg_vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "containerd-hosts")
    for name, _, _ in nodes:
        d = os.path.join(workdir, "nodes", name, "root") + cfg_vol["hostPath"]["path"]
        os.makedirs(os.path.join(d, "docker.io"))
        os.makedirs(os.path.join(d, "quay.io"))
        with open(os.path.join(d, "docker.io", "hosts.toml"), "w") as f:
            f.write('server = "https://registry-1.docker.io"\n\n[host."https://mirror.example.internal"]\n'
                    '  capabilities = ["pull"]\n')
        with open(os.path.join(d, "quay.io", "hosts.toml"), "w") as f:
            f.write('server = "https://quay.io"\n')
        hosts_dirs[name] = d
    before = {name: snapshot(d) for name, d in hosts_dirs.items()}

    # Pods of the StatefulSets, each with its own namespace and address.
    pods = []
    for sts in by_kind["StatefulSet"]:
        base = sts["metadata"]["name"]
        for i in range(int(sts["spec"]["replicas"])):
            pname = f"{base}-{i}"
            ns, ip = cluster.add_host(f"p{len(pods)}")
            pods.append(Pod(sts, pname, nodes[i % len(nodes)][0], ns, ip, ip, cluster, objects, workdir))
            cluster.resolve(f"{pname}.{sts['spec']['serviceName']}.{svc_suffix}", ip)
    agent_pods = []
    for name, ns, ip in nodes:
        pname = f"{ds['metadata']['name']}-{name}"
        agent_pods.append(Pod(ds, pname, name, ns, ip, ip, cluster, objects, workdir))
    # Services: their names resolve to the pods they select (every address, as for headless).
    all_pods = pods + agent_pods
    for svc in by_kind["Service"]:
        sel = svc["spec"]["selector"]
        for p in all_pods:
            labels = p.workload["spec"]["template"]["metadata"]["labels"]
            if all(labels.get(k) == v for k, v in sel.items()):
                cluster.resolve(f"{svc['metadata']['name']}.{svc_suffix}", p.ip)
    cluster.write_hosts()

    # Install: init containers, then every pod, then readiness as the probes say.
    t0 = time.time()
    for p in all_pods:
        p.run_init()
    for p in all_pods:
        p.start()
    deadline = time.time() + READY_TIMEOUT_S
    for p in all_pods:
        p.wait_ready(deadline)
    log(f"{len(all_pods)} pods ready in {time.time() - t0:.1f}s: {', '.join(p.name for p in all_pods)}")

    # The init container's containerd config: the registry name pods pull by goes to the agent.
    init = next(c for c in ds["spec"]["template"]["spec"]["initContainers"])
    registry_arg = next(a for a in init["args"] if a.startswith("--registry="))
    registry = registry_arg.split("=", 1)[1].split(",")[0].split("=")[0]
    for name, d in hosts_dirs.items():
        toml = open(os.path.join(d, registry, "hosts.toml")).read()
        if '[host."http://127.0.0.1:' not in toml:
            raise Failure(f"{name}: hosts.toml for {registry} does not point at the node's agent:\n{toml}")
    log(f"init containers wrote hosts.toml for {registry} on every node")

    # Push to the origin Service's name, from node 0 (as CI inside the cluster would).
    origin_svc = next(s for s in by_kind["Service"] if s["spec"].get("clusterIP") != "None"
                      and s["spec"]["selector"].get("app.kubernetes.io/component") == "origin")
    push_host = f"{origin_svc['metadata']['name']}.{svc_suffix}:{origin_svc['spec']['ports'][0]['port']}"
    if push_host != registry:
        raise Failure(f"the mirrored registry {registry} is not the origin Service {push_host}")
    ref = f"{registry}/team/app:1"
    skopeo_cache = os.path.join(workdir, "skopeo-cache")
    os.makedirs(skopeo_cache, exist_ok=True)
    run(["ip", "netns", "exec", nodes[0][1], "unshare", "-m", "sh", "-c",
         'mkdir -p /var/lib/containers/cache && mount --bind "$0" /var/lib/containers/cache && exec "$@"',
         skopeo_cache, "skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{args.layout}:{args.tag}", f"docker://{ref}"], timeout=120)
    index = json.load(open(os.path.join(args.layout, "index.json")))
    want = next(m["digest"] for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == args.tag)
    log(f"pushed {ref} ({want}) through the origin Service")

    # Pull on every node with containerd through the hosts.toml the chart wrote.
    agent_urls = [(p.ns, p.url()) for p in agent_pods]
    for i, (name, ns, _) in enumerate(nodes):
        d = os.path.join(workdir, "ctrd", name)
        os.makedirs(d)
        sock = os.path.join(d, "containerd.sock")
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(f'version = 2\nroot = "{d}/root"\nstate = "{d}/state"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", '
                    '"io.containerd.tracing.processor.v1.otlp"]\n'
                    f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n')
        cp = cluster.start(f"containerd-{name}", ns, ["containerd", "--config", os.path.join(d, "config.toml")],
                           dict(os.environ), 0, os.path.join(d, "containerd.log"))
        end = time.time() + 30
        while run(["ctr", "--address", sock, "version"], check=False).returncode != 0:
            if cp.poll() is not None or time.time() > end:
                raise Failure(f"containerd on {name} did not start")
            time.sleep(0.2)
        t = time.time()
        run(["ip", "netns", "exec", ns, "ctr", "--address", sock, "images", "pull",
             "--hosts-dir", hosts_dirs[name], ref], timeout=PULL_TIMEOUT_S)
        got = run(["ctr", "--address", sock, "images", "ls", "-q"]).stdout.split()
        out = run(["ctr", "--address", sock, "images", "ls"]).stdout
        if ref not in got or want not in out:
            raise Failure(f"{name}: ctr images ls does not show {ref} at {want}:\n{out}")
        log(f"{name}: ctr pulled {ref} through its agent in {time.time() - t:.1f}s ({want})")

    # Where the bytes came from: the second node's agent from peers; the first agent served it.
    m = [metrics(ns, url) for ns, url in agent_urls]
    second_peer = metric_sum(m[1], "shoal_agent_received_bytes_total", 'source="peer"')
    first_sent = metric_sum(m[0], "shoal_agent_peer_sent_bytes_total")
    requests = [metric_sum(x, "shoal_agent_http_requests_total") for x in m]
    log(f"agent requests {requests}; node-1 received {second_peer:.0f} B from peers; node-0 sent {first_sent:.0f} B to peers")
    if min(requests) <= 0:
        raise Failure("an agent answered no registry requests: containerd did not use the mirror")
    if second_peer <= 0 or first_sent <= 0:
        raise Failure("the second node got no bytes from the first node's agent")

    # Every metric name the chart's alerts and dashboard use is exported by some component.
    exported = set()
    for p in all_pods:
        exported |= family_names(metrics(p.ns, p.url()))
    used = set()
    for d in yaml.safe_load_all(open(args.metrics_rendered)):
        if not d:
            continue
        text = json.dumps(d)
        used |= set(re.findall(r"\b(shoal_[a-z0-9_]+)", text))
    used = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in exported else n for n in used}
    exported_bases = exported | {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    missing = sorted(used - exported_bases)
    if not used:
        raise Failure("no metric names found in the alerts and dashboard")
    if missing:
        raise Failure(f"the chart's alerts or dashboard use metrics nobody exports: {missing}")
    log(f"all {len(used)} metric names the alerts and dashboard use are exported")

    # Uninstall: the release's pods go away (all at once, as Kubernetes deletes them; each
    # drains for its drain_delay), then the post-delete hook runs.
    procs = [proc for p in all_pods for _, proc in p.procs]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        cluster.stop(proc, timeout=30)
    log("uninstall: pods stopped; running the post-delete hook")
    hook_ds = [h for h in hooks if h["kind"] == "DaemonSet"]
    hook_svc = [h for h in hooks if h["kind"] == "Service"]
    hook_jobs = [h for h in hooks if h["kind"] == "Job"]
    if not (hook_ds and hook_svc and hook_jobs):
        raise Failure("the post-delete hook lacks its DaemonSet, Service or Job")
    hooks_sorted = sorted(hooks, key=lambda h: int(h["metadata"]["annotations"].get("helm.sh/hook-weight", "0")))
    restore_pods = []
    for h in hooks_sorted:
        if h["kind"] == "DaemonSet":
            for name, _, node_ip in nodes:
                ns, ip = cluster.add_host(f"r{len(restore_pods)}")
                restore_pods.append(Pod(h, f"{h['metadata']['name']}-{name}", name, ns, ip, node_ip,
                                        cluster, objects | {}, workdir))
            for svc in hook_svc:
                for p in restore_pods:
                    cluster.resolve(f"{svc['metadata']['name']}.{svc_suffix}", p.ip)
            cluster.write_hosts()
            for p in restore_pods:
                p.start()
        elif h["kind"] == "Job":
            ns, ip = cluster.add_host("job")
            cluster.write_hosts()
            job = Pod(h, h["metadata"]["name"], nodes[0][0], ns, ip, ip, cluster, objects, workdir)
            t = time.time()
            job.start()
            for c, proc in job.procs:
                rc = proc.wait(120)
                if rc != 0:
                    raise Failure(f"hook Job {h['metadata']['name']}/{c['name']} failed with {rc}")
            log(f"hook Job {h['metadata']['name']} saw every node restored in {time.time() - t:.1f}s")
    for p in restore_pods:
        for _, proc in p.procs:
            cluster.stop(proc)

    for name, d in hosts_dirs.items():
        after = snapshot(d)
        if after != before[name]:
            diff = sorted(set(after.items()) ^ set(before[name].items()), key=str)
            raise Failure(f"{name}: containerd config not restored; differences: {[k for k, _ in diff]}")
    log("every node's containerd config is back as it was before the install")
    return True


if __name__ == "__main__":
    sys.exit(main())
