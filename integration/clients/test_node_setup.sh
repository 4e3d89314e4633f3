#!/usr/bin/env bash
# `shoal node setup` as the Helm chart's init container runs it: root with CAP_CHOWN alone
# (no CAP_DAC_OVERRIDE, so root is held to a directory's permission bits like anyone else),
# with TLS on: the agent's data dir handed to the agent's user, the mirror CA copied into it,
# containerd's hosts.toml naming it. Run twice, as a pod restart does, when the data dir
# already belongs to the agent's user. Then `node restore` puts hosts.toml back.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init node_setup
require_shoal_under_test
[[ $(id -u) == 0 ]] || { log "SKIP: needs root to drop to CAP_CHOWN alone"; exit 0; }
command -v setpriv >/dev/null || { log "SKIP: no setpriv (util-linux)"; exit 0; }

owner=65532
data=$T/agent
hosts=$T/certs.d
ca=$T/ca.crt
"$SHOAL_BIN" certs ca --out "$T/pki" >/dev/null
cp "$T/pki/ca.pem" "$ca"

# As the chart's init container: every capability but CHOWN out of the bounding set, so a
# root process (which gets the bounding set on exec) holds CHOWN alone.
setup() {
  setpriv --bounding-set=-all,+chown --inh-caps=-all -- "$SHOAL_BIN" node setup \
    --data-dir "$data" --owner "$owner:$owner" --hosts-dir "$hosts" --registry docker.io \
    --mirror https://127.0.0.1:5000 --mirror-ca "$ca" --host-data-dir /var/lib/shoal/agent
}
caps=$(setpriv --bounding-set=-all,+chown --inh-caps=-all -- grep CapEff /proc/self/status | awk '{print $2}')
[[ $caps == 0000000000000001 ]] || die "the emulated init container has capabilities $caps, not CHOWN alone"

for run in first restart; do
  setup >"$T/setup-$run.log" 2>&1 || { cat "$T/setup-$run.log" >&2; die "node setup failed on its $run run"; }
  [[ $(stat -c %u:%g "$data") == "$owner:$owner" ]] || die "$run run: data dir owned by $(stat -c %u:%g "$data")"
  cmp -s "$ca" "$data/mirror-ca.pem" || die "$run run: the mirror CA in the data dir is not the CA"
  [[ ! -e $data/.mirror-ca.pem.shoal-tmp ]] || die "$run run: left its temp file"
  grep -q 'ca = "/var/lib/shoal/agent/mirror-ca.pem"' "$hosts/docker.io/hosts.toml" ||
    die "$run run: hosts.toml does not name the CA: $(cat "$hosts/docker.io/hosts.toml")"
  log "$run run: ok"
done

"$SHOAL_BIN" node restore --hosts-dir "$hosts" >/dev/null
[[ ! -e $hosts/docker.io/hosts.toml ]] || die "restore left the hosts.toml setup wrote"
log "PASS"
