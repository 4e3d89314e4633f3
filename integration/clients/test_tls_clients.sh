#!/usr/bin/env bash
# Real clients against a Shoal that runs TLS everywhere, with a cluster CA made here by
# openssl: the origin's certificate issued by openssl, the tracker's and agents' by
# `shoal certs issue` from that CA; peers talk mutual TLS. skopeo pushes to the origin and
# inspects through an agent with the CA as its cert dir, containerd pulls through an agent
# mirror whose hosts.toml names the CA, dockerd pulls through the other agent. Plain HTTP
# and clients that do not trust the CA are refused.
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"
lib_init tls_clients
require_shoal_under_test

make_tls_pki "$T/pki"
start_shoal_cluster 2
start_containerd
start_dockerd
[[ $ORIGIN_URL == https://* ]] || die "the origin does not serve https: $ORIGIN_URL"
for f in "$ORIGIN_LOG" "${AGENT_LOGS[@]}"; do
  grep -q 'TLS on' "$f" || die "$f has no 'TLS on' line"
done
grep -q 'peer_tls=true' "$AGENT_LOG" || die "agent 0 did not turn peer TLS on"

# Plain HTTP to a TLS listener gets no HTTP answer; https without the CA fails verification.
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://$ORIGIN/v2/" || true)
[[ $code != 200 ]] || die "plain http://$ORIGIN/v2/ answered 200"
if curl -sf --max-time 5 "https://$ORIGIN/v2/" >/dev/null 2>&1; then
  die "curl without the CA accepted the origin's certificate"
fi
assert_eq 200 "$(http_code "$ORIGIN_URL/v2/")" "GET /v2/ over https with the CA"

# skopeo: push with the CA as the destination's cert dir; without it, the push fails.
certs=$T/skopeo-certs
mkdir -p "$certs"
cp "$TLS_DIR/ca.pem" "$certs/ca.crt"
src=$T/src
bb_digest=$(oci_busybox_image "$src" v1)
if skopeo_ copy -q "oci:$src:v1" "docker://$ORIGIN/tls/busybox:v1" >"$T/untrusted.out" 2>&1; then
  die "skopeo pushed to the origin without trusting its CA"
fi
grep -qi 'certificate' "$T/untrusted.out" || die "skopeo failed for another reason: $(cat "$T/untrusted.out")"
skopeo_ copy -q --dest-cert-dir "$certs" --preserve-digests "oci:$src:v1" "docker://$ORIGIN/tls/busybox:v1" ||
  die "skopeo push over TLS failed"
log "pushed busybox $bb_digest over TLS"
got=$(skopeo_ inspect --cert-dir "$certs" --format '{{.Digest}}' "docker://${AGENTS[1]}/tls/busybox:v1") ||
  die "skopeo inspect through agent 1 failed"
assert_eq "$bb_digest" "$got" "digest skopeo reads through agent 1"

# shoal preheat over https, trusting the CA (and refused without it).
if "$SHOAL_BIN" preheat "$AGENT_URL" tls/busybox:v1 >"$T/preheat-noca.out" 2>&1; then
  die "shoal preheat trusted the agent without the CA"
fi
"$SHOAL_BIN" preheat --tls-ca "$TLS_DIR/ca.pem" "$AGENT_URL" tls/busybox:v1 >"$T/preheat.out" 2>&1 || {
  cat "$T/preheat.out" >&2
  die "shoal preheat --tls-ca failed"
}

# containerd: the agent as a TLS mirror, trusted through hosts.toml's ca.
hosts=$T/hosts.d
ctr_hosts_dir "$hosts" "$ORIGIN" "$AGENT_URL" "$TLS_DIR/ca.pem"
ref=$ORIGIN/tls/busybox:v1
ctr_ -n tls images pull --hosts-dir "$hosts" "$ref" >"$T/ctr.out" 2>&1 || {
  cat "$T/ctr.out" >&2
  die "ctr pull through the TLS agent failed"
}
assert_eq "$bb_digest" "$(ctr_ -n tls images ls | awk -v r="$ref" '$1==r {print $3}')" "digest of $ref in ctr"
m=$src/blobs/sha256/${bb_digest#sha256:}
for d in $(jq -r '.config.digest, .layers[].digest' "$m"); do
  assert_eq "$d" "$(ctr_ -n tls content get "$d" | sha256sum | sed 's/^/sha256:/; s/ .*//')" "content of $d"
done
assert_eq ok "$(ctr_ -n tls run --rm "$ref" "it-$RANDOM" /bin/sh -c 'echo ok')" "output of ctr run $ref"
grep -Eq "path=/v2/tls/busybox/manifests/v1\?ns=.* status=200" "$AGENT_LOG" ||
  die "agent 0's log has no mirror request for the manifest"

# A hosts.toml without the CA: containerd refuses the agent's certificate.
ctr_hosts_dir "$T/hosts-noca" "$ORIGIN" "$AGENT_URL"
if ctr_ -n noca images pull --hosts-dir "$T/hosts-noca" "$ref" >"$T/noca.out" 2>&1; then
  die "ctr pulled through the agent without trusting its CA"
fi

# dockerd through agent 1 over https (dockerd skips verification for 127.0.0.0/8, which it
# treats as insecure: this checks that Docker and the TLS agent speak, not the CA).
dk pull "${AGENTS[1]}/tls/busybox:v1" >"$T/docker.out" 2>&1 || {
  cat "$T/docker.out" >&2
  die "docker pull through the TLS agent failed"
}
assert_eq ok "$(dk run --rm --network none "${AGENTS[1]}/tls/busybox:v1" /bin/sh -c 'echo ok')" "docker run"

# The agents received pieces over mutual TLS.
received=$(metric "${AGENT_URLS[1]}" shoal_agent_received_bytes_total 'source="peer"')
((received > 0)) || die "agent 1 received no bytes from peers"
log "agent 1 received $received bytes from peers over mutual TLS"
log "PASS"
