# shellcheck shell=bash
# shellcheck disable=SC2034 # FLEET_* and NETNS_* are for the scripts that source this file
# Several simulated hosts on one machine, joined by shaped links: a bridge in a network
# namespace of its own, one namespace per host, a veth pair from each host to the bridge,
# and a `tc tbf` qdisc on BOTH ends of every veth, so a host's upload (its end) and its
# download (the bridge's end) are each limited to the link's rate, as on a full-duplex NIC.
# Sourced by integration/bench/fleet.sh and integration/clients/test_fleet_netns.sh, after
# integration/clients/lib.sh (which provides lib_init, on_exit, log, die and $T).
#
#   netns_init                       once: names for this run, one cleanup registered with on_exit
#   netns_add_host NAME ADDR MBIT    a namespace "$NETNS_PREFIX-NAME" with ADDR/16 on a veth
#                                    shaped at MBIT Mbit/s both ways; sets NETNS_NS NETNS_DEV
#   in_ns NS CMD...                  run CMD inside namespace NS
#   ns_bg NS LOG CMD...              start CMD inside NS in the background, tracked by PID (NS_PID)
#   ns_stop PID... / ns_stop_all     stop tracked processes (TERM, then KILL), by PID
#   netns_del_all                    stop every tracked process, delete every namespace of this run
#   link_bytes NS DEV rx|tx          a veth's byte counter (whole frames, as tbf counts them)
#   ns_push, ns_metric               push a blob / read a metric from inside a namespace
#
# On top of that, a fleet (fleet_setup, fleet_start_shoal, fleet_pull, fleet_verify, ...): an
# "origin" namespace (10.77.0.1: shoal origin, tracker, or docker-registry) and N host
# namespaces (10.77.1.1, ...), each with a default-settings `shoal agent` on 127.0.0.1:5000 of
# its own namespace, as on a real node; see the comments of each function.
#
# Addresses: 10.77.0.0/16 only, on interfaces that exist only inside these namespaces. Nothing
# is routed anywhere: no default route, no address outside the namespaces, no change to the
# host's own network. Names carry the script's PID ($$), so parallel runs and leftovers of a
# killed run never collide; interface names stay within the kernel's 15 bytes.
#
# Shaping (tbf): rate MBIT; burst = max(rate × 4 ms, 32 KiB), i.e. what the link sends in
# 4 ms (the old HZ=250 rule of thumb: the bucket must refill at least once per timer tick, or
# tbf cannot reach its rate) but never less than 32 KiB, so a couple of full-size GSO segments
# and bursts of small ACKs pass without being dropped; latency 50 ms sets the queue limit
# (rate × 50 ms + burst): a buffer deep enough for TCP to fill the link without the seconds of
# bufferbloat an unbounded queue would add. tbf counts whole Ethernet frames, so the best
# TCP goodput is about 95 % of the rate (1448 payload bytes in 1514-byte frames).

# NETNS_MTU (unset: the kernel's 1500) sets every veth's MTU, e.g. 9000 for jumbo frames as in
# many data centres: a sixth of the packets for the same bytes, so the emulated links cost this
# machine's kernel far less per byte (tbf's burst, at least 32 KiB, still holds a 9000-byte frame).
NETNS_PREFIX=
NETNS_BR=
NETNS_ALL=()           # every namespace of this run, in creation order
declare -gA NETNS_PIDS # PID -> name of every process started with ns_bg and not yet stopped
NETNS_HOSTS=0

netns_init() {
  command -v ip >/dev/null || die "ip (iproute2) missing"
  command -v tc >/dev/null || die "tc (iproute2) missing"
  NETNS_TAG=f$$ # f<pid>: at most 8 bytes with pid_max up to 4194304
  NETNS_PREFIX=shoal-$NETNS_TAG
  on_exit netns_del_all
}

# netns_bridge: the bridge namespace (created by the first netns_add_host if not yet there).
netns_bridge() {
  [[ -n $NETNS_BR ]] && return 0
  NETNS_BR=$NETNS_PREFIX-br
  _netns_add "$NETNS_BR"
  ip -n "$NETNS_BR" link add br0 type bridge
  # A switch does not filter. Once dockerd has run on this machine, its br_netfilter module
  # sends every bridged frame of a new namespace through netfilter's hooks (br_nf_* frames were
  # in 2.5 % of the agents' CPU samples of a 20-host run), so the emulated links would cost
  # more on a machine that ran the Docker tests first.
  local f
  for f in /proc/sys/net/bridge/bridge-nf-call-{iptables,ip6tables,arptables}; do
    if [[ -e $f ]]; then ip netns exec "$NETNS_BR" sh -c "echo 0 >$f"; fi
  done
  ip -n "$NETNS_BR" link set br0 up
}

_netns_add() {
  ip netns add "$1"
  NETNS_ALL+=("$1")
  ip -n "$1" link set lo up
  if [[ -n ${NETNS_CC:-} ]]; then
    # A namespace other than the machine's may only pick an algorithm the machine allows.
    # That list is the whole machine's (not per namespace): put back as it was at exit.
    local allowed
    allowed=$(sysctl -n net.ipv4.tcp_allowed_congestion_control)
    if [[ " $allowed " != *" $NETNS_CC "* ]]; then
      log "allowing TCP congestion control $NETNS_CC in namespaces (net.ipv4.tcp_allowed_congestion_control)"
      on_exit "sysctl -qw net.ipv4.tcp_allowed_congestion_control='$allowed'"
      sysctl -qw net.ipv4.tcp_allowed_congestion_control="$allowed $NETNS_CC"
    fi
    ip netns exec "$1" sysctl -qw net.ipv4.tcp_congestion_control="$NETNS_CC" ||
      die "congestion control $NETNS_CC is not available (modprobe tcp_$NETNS_CC?)"
  fi
}

# netns_cc: the TCP congestion control new namespaces use ($NETNS_CC, else what a new
# namespace inherits from the machine).
netns_cc() {
  if [[ -n ${NETNS_CC:-} ]]; then echo "$NETNS_CC"; else sysctl -n net.ipv4.tcp_congestion_control; fi
}

# netns_burst MBIT: tbf burst in bytes, max(rate × 4 ms, 32 KiB).
netns_burst() {
  awk -v m="$1" 'BEGIN {b = m * 1e6 / 8 / 250; if (b < 32768) b = 32768; printf "%d", b}'
}

# netns_shape NS DEV MBIT: tbf on DEV's egress inside NS (replaces any qdisc there).
netns_shape() {
  tc -n "$1" qdisc replace dev "$2" root tbf rate "$3mbit" burst "$(netns_burst "$3")" latency 50ms
}

# netns_port DEV: the bridge's end of host veth DEV (its port on the switch).
netns_port() { echo "${1}b"; }

# netns_add_host NAME ADDR MBIT: namespace $NETNS_PREFIX-NAME with ADDR/16 on veth "<tag>NAME"
# (bridge side "<tag>NAMEb"), both ends shaped at MBIT. NAME: at most 6 bytes.
netns_add_host() {
  local name=$1 addr=$2 mbit=$3 ns dev peer
  netns_bridge
  ns=$NETNS_PREFIX-$name
  dev=$NETNS_TAG$name
  peer=$(netns_port "$dev")
  ((${#peer} <= 15)) || die "interface name $peer is longer than 15 bytes"
  _netns_add "$ns"
  ip link add "$dev" netns "$ns" type veth peer name "$peer" netns "$NETNS_BR"
  ip -n "$ns" addr add "$addr/16" dev "$dev"
  if [[ -n ${NETNS_MTU:-} ]]; then
    ip -n "$ns" link set "$dev" mtu "$NETNS_MTU"
    ip -n "$NETNS_BR" link set "$peer" mtu "$NETNS_MTU"
  fi
  ip -n "$ns" link set "$dev" up
  ip -n "$NETNS_BR" link set "$peer" master br0 up
  netns_shape "$ns" "$dev" "$mbit"         # the host's upload
  netns_shape "$NETNS_BR" "$peer" "$mbit"  # the host's download
  NETNS_NS=$ns NETNS_DEV=$dev
  NETNS_HOSTS=$((NETNS_HOSTS + 1))
}

in_ns() {
  local ns=$1
  shift
  ip netns exec "$ns" "$@"
}

# ns_bg NS LOG CMD...: CMD in NS, in the background, output to LOG. `ip netns exec` execs CMD,
# so NS_PID is CMD's own PID (its /proc/PID/stat is CMD's CPU time).
ns_bg() {
  local ns=$1 logf=$2
  shift 2
  ip netns exec "$ns" "$@" >"$logf" 2>&1 &
  NS_PID=$!
  NETNS_PIDS[$NS_PID]=$logf
  register_log "$logf"
}

# ns_stop PID...: stop processes started with ns_bg (only those: a PID not in the table is
# ignored, so a PID the kernel has since given to someone else is never signalled).
ns_stop() {
  local pid
  # TERM them all first, so they shut down together; then wait for each (lib.sh's stop_pid).
  for pid in "$@"; do
    [[ -n ${NETNS_PIDS[$pid]:-} ]] || continue
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "$@"; do
    [[ -n ${NETNS_PIDS[$pid]:-} ]] || continue
    stop_pid "$pid" "pid $pid (${NETNS_PIDS[$pid]})" 10
    unset "NETNS_PIDS[$pid]"
  done
}

ns_stop_all() {
  local pids=("${!NETNS_PIDS[@]}")
  ((${#pids[@]} == 0)) || ns_stop "${pids[@]}"
}

# netns_del_all: every tracked process, then every namespace (a namespace's veth ends go with
# it). Safe to call more than once; then the next netns_add_host starts a fresh bridge.
netns_del_all() {
  local i
  ns_stop_all
  for ((i = ${#NETNS_ALL[@]} - 1; i >= 0; i--)); do
    ip netns del "${NETNS_ALL[i]}" 2>/dev/null || log "could not delete namespace ${NETNS_ALL[i]}"
  done
  NETNS_ALL=() NETNS_BR='' NETNS_HOSTS=0
}

# link_counts NS DEV rx|tx: "BYTES FRAMES" through DEV in NS so far.
link_counts() {
  ip -n "$1" -s -j link show dev "$2" | jq -r --arg d "$3" '.[0].stats64[$d] | "\(.bytes) \(.packets)"'
}

# link_bytes NS DEV rx|tx: bytes through DEV in NS so far.
link_bytes() {
  local c
  c=$(link_counts "$@")
  echo "${c% *}"
}

# ns_push NS BASE_URL REPO FILE DIGEST: push a blob (POST, then PUT ?digest=) from inside NS;
# dies unless 201. Works with shoal origin and docker-registry.
ns_push() {
  local ns=$1 base=$2 repo=$3 file=$4 digest=$5 hdr loc code
  hdr=$(mktemp "$T/push-hdr.XXXXXX")
  code=$(in_ns "$ns" curl "${CURL_TLS[@]}" -sS -o /dev/null -D "$hdr" -w '%{http_code}' --max-time 30 -X POST "$base/v2/$repo/blobs/uploads/")
  [[ $code == 202 ]] || die "POST $base/v2/$repo/blobs/uploads/ answered $code"
  loc=$(tr -d '\r' <"$hdr" | awk 'tolower($1)=="location:" {print $2}')
  [[ -n $loc ]] || die "POST $base/v2/$repo/blobs/uploads/ gave no Location"
  [[ $loc == /* ]] && loc=$base$loc
  if [[ $loc == *\?* ]]; then loc="$loc&digest=$digest"; else loc="$loc?digest=$digest"; fi
  code=$(in_ns "$ns" curl "${CURL_TLS[@]}" -sS -o "$hdr" -w '%{http_code}' --max-time 300 -H 'Expect:' \
    -H 'Content-Type: application/octet-stream' -T "$file" "$loc")
  [[ $code == 201 ]] || die "PUT of $file to $base answered $code: $(cat "$hdr")"
  rm -f "$hdr"
}

# ns_metric NS URL NAME [LABEL_MATCH]: like lib.sh's metric, read from inside NS; prints the sum
# of matching samples, or "n/a" when /metrics has no sample of NAME at all.
ns_metric() {
  in_ns "$1" curl "${CURL_TLS[@]}" -sf --max-time 5 "$2/metrics" | awk -v n="$3" -v m="${4:-}" '
    /^#/ { next }
    { key = $1; base = key; sub(/\{.*/, "", base) }
    base == n && (m == "" || index(key, m) > 0) { s += $2; seen = 1 }
    END { if (seen) printf "%.0f\n", s; else print "n/a" }' # not %d: mawk clamps that at 2^31 - 1
}


# ns_wait PID: wait for a process started with ns_bg to end by itself; prints nothing, returns
# its exit status, and forgets it.
ns_wait() {
  local rc=0
  wait "$1" 2>/dev/null || rc=$?
  unset "NETNS_PIDS[$1]"
  return "$rc"
}

# ---------------------------------------------------------------------------------------
# a fleet: one "origin" namespace (10.77.0.1) and N host namespaces (10.77.1.1, 10.77.1.2, ...)

FLEET_ORIGIN_ADDR=10.77.0.1
FLEET_ORIGIN_URL=http://$FLEET_ORIGIN_ADDR:5000   # shoal origin
FLEET_TRACKER_URL=http://$FLEET_ORIGIN_ADDR:5100  # shoal tracker
FLEET_ORIGIN_PEER=$FLEET_ORIGIN_ADDR:5200         # the origin's peer listener
FLEET_AGENT_URL=http://127.0.0.1:5000             # every host's own agent, in its own namespace
FLEET_AGENT_PEER_PORT=7001
FLEET_ORIGIN_ARGS=() # more flags for the origin (e.g. --upstream)
FLEET_AGENT_ARGS=()  # more flags for every agent (e.g. --config FILE)

# fleet_setup N HOST_MBIT ORIGIN_MBIT [SLOW]: the origin namespace, its link at ORIGIN_MBIT, and
# N hosts at HOST_MBIT, of which the last SLOW (default 0) are at HOST_MBIT / 5.
# Sets FLEET_N FLEET_ORIGIN_NS FLEET_ORIGIN_DEV FLEET_NS[i] FLEET_DEV[i] FLEET_ADDR[i]
# FLEET_MBIT[i] FLEET_SLOW[i] (1 for a straggler), i < N.
fleet_setup() {
  local n=$1 host=$2 origin=$3 slow=${4:-0} i mbit
  FLEET_N=$n
  FLEET_NS=() FLEET_DEV=() FLEET_ADDR=() FLEET_MBIT=() FLEET_SLOW=()
  netns_add_host o "$FLEET_ORIGIN_ADDR" "$origin"
  FLEET_ORIGIN_NS=$NETNS_NS FLEET_ORIGIN_DEV=$NETNS_DEV
  for ((i = 0; i < n; i++)); do
    FLEET_ADDR[i]=10.77.$((1 + i / 250)).$((1 + i % 250))
    if ((i >= n - slow)); then
      mbit=$(awk -v m="$host" 'BEGIN {printf "%g", m / 5}')
      FLEET_SLOW[i]=1
    else
      mbit=$host
      FLEET_SLOW[i]=0
    fi
    FLEET_MBIT[i]=$mbit
    netns_add_host "h$i" "${FLEET_ADDR[i]}" "$mbit"
    FLEET_NS[i]=$NETNS_NS FLEET_DEV[i]=$NETNS_DEV
  done
  log "namespaces: origin $FLEET_ORIGIN_NS ($FLEET_ORIGIN_ADDR, $origin Mbit/s), $n hosts from" \
    "${FLEET_ADDR[0]} at $host Mbit/s ($slow of them at a fifth of that), bridge $NETNS_BR"
}

# fleet_start_shoal DIR: shoal origin + tracker in the origin namespace and one agent with
# default settings in every host namespace, data under DIR. Sets FLEET_ORIGIN_PID
# FLEET_TRACKER_PID FLEET_AGENT_PIDS[i] FLEET_AGENT_LOGS[i] FLEET_SHOAL_PIDS (all of them).
fleet_start_shoal() {
  local dir=$1 i tls_o=() tls_t=() tls_a=()
  [[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN"
  mkdir -p "$dir"
  _fleet_tls "$dir/pki"
  if ((${FLEET_TLS:-0})); then
    tls_o=(--tls-cert "$dir/pki/origin.pem" --tls-key "$dir/pki/origin-key.pem" --cluster-ca "$dir/pki/ca.pem")
    tls_t=(--tls-cert "$dir/pki/tracker.pem" --tls-key "$dir/pki/tracker-key.pem" --cluster-ca "$dir/pki/ca.pem")
  fi
  FLEET_ORIGIN_LOG=$dir/origin.log
  ns_bg "$FLEET_ORIGIN_NS" "$FLEET_ORIGIN_LOG" "$SHOAL_BIN" origin --listen "${FLEET_ORIGIN_URL#*://}" \
    --peer-listen "$FLEET_ORIGIN_PEER" --data-dir "$dir/origin" "${tls_o[@]}" "${FLEET_ORIGIN_ARGS[@]}"
  FLEET_ORIGIN_PID=$NS_PID
  wait_ready 30 "$FLEET_ORIGIN_PID" "shoal origin" in_ns "$FLEET_ORIGIN_NS" curl "${CURL_TLS[@]}" -sf --max-time 2 "$FLEET_ORIGIN_URL/healthz" ||
    die "$WAIT_ERR (log: $FLEET_ORIGIN_LOG)"
  FLEET_TRACKER_LOG=$dir/tracker.log
  ns_bg "$FLEET_ORIGIN_NS" "$FLEET_TRACKER_LOG" "$SHOAL_BIN" tracker --listen "${FLEET_TRACKER_URL#*://}" \
    --origin "$FLEET_ORIGIN_URL" "${tls_t[@]}"
  FLEET_TRACKER_PID=$NS_PID
  FLEET_AGENT_PIDS=() FLEET_AGENT_LOGS=()
  for ((i = 0; i < FLEET_N; i++)); do
    FLEET_AGENT_LOGS[i]=$dir/agent$i.log
    if ((${FLEET_TLS:-0})); then
      "$SHOAL_BIN" certs issue --ca "$dir/pki" --name "agent$i" --role agent --ip 127.0.0.1 --ip "${FLEET_ADDR[i]}" >/dev/null
      tls_a=(--tls-cert "$dir/pki/agent$i.pem" --tls-key "$dir/pki/agent$i-key.pem" --cluster-ca "$dir/pki/ca.pem")
    fi
    ns_bg "${FLEET_NS[i]}" "${FLEET_AGENT_LOGS[i]}" "$SHOAL_BIN" agent --listen "${FLEET_AGENT_URL#*://}" \
      --peer-listen "0.0.0.0:$FLEET_AGENT_PEER_PORT" --peer-advertise "${FLEET_ADDR[i]}:$FLEET_AGENT_PEER_PORT" \
      --origin "$FLEET_ORIGIN_URL" --tracker "$FLEET_TRACKER_URL" --data-dir "$dir/agent$i" "${tls_a[@]}" \
      "${FLEET_AGENT_ARGS[@]}"
    FLEET_AGENT_PIDS[i]=$NS_PID
  done
  wait_ready 30 "$FLEET_TRACKER_PID" "shoal tracker" in_ns "$FLEET_ORIGIN_NS" curl "${CURL_TLS[@]}" -sf --max-time 2 "$FLEET_TRACKER_URL/healthz" ||
    die "$WAIT_ERR (log: $FLEET_TRACKER_LOG)"
  for ((i = 0; i < FLEET_N; i++)); do
    wait_ready 30 "${FLEET_AGENT_PIDS[i]}" "shoal agent $i" in_ns "${FLEET_NS[i]}" curl "${CURL_TLS[@]}" -sf --max-time 2 "$FLEET_AGENT_URL/healthz" ||
      die "$WAIT_ERR (log: ${FLEET_AGENT_LOGS[i]})"
    # The link, end to end: every host reaches the origin through the bridge.
    in_ns "${FLEET_NS[i]}" curl "${CURL_TLS[@]}" -sf --max-time 5 -o /dev/null "$FLEET_ORIGIN_URL/healthz" ||
      die "host $i (${FLEET_ADDR[i]}) cannot reach the origin at $FLEET_ORIGIN_URL"
  done
  FLEET_SHOAL_PIDS=("${FLEET_AGENT_PIDS[@]}" "$FLEET_TRACKER_PID" "$FLEET_ORIGIN_PID")
  log "shoal up: origin $FLEET_ORIGIN_URL (pid $FLEET_ORIGIN_PID), tracker $FLEET_TRACKER_URL" \
    "(pid $FLEET_TRACKER_PID), $FLEET_N agents (pids ${FLEET_AGENT_PIDS[*]}), logs in $dir"
}

fleet_stop_shoal() { ns_stop "${FLEET_SHOAL_PIDS[@]}"; }

# _fleet_tls DIR: with FLEET_TLS=1, a cluster CA and the origin's and tracker's certificates
# in DIR (shoal certs), https URLs, and curl trusting the CA (CURL_TLS, FLEET_CA); without
# it, the plain URLs. The agents' certificates are issued as they start.
_fleet_tls() {
  local dir=$1 scheme=http
  CURL_TLS=() FLEET_CA=
  if ((${FLEET_TLS:-0})); then
    scheme=https
    "$SHOAL_BIN" certs ca --out "$dir" >/dev/null
    for role in origin tracker; do
      "$SHOAL_BIN" certs issue --ca "$dir" --name "$role" --role "$role" --ip "$FLEET_ORIGIN_ADDR" >/dev/null
    done
    CURL_TLS=(--cacert "$dir/ca.pem") FLEET_CA=$dir/ca.pem
  fi
  FLEET_ORIGIN_URL=$scheme://$FLEET_ORIGIN_ADDR:5000
  FLEET_TRACKER_URL=$scheme://$FLEET_ORIGIN_ADDR:5100
  FLEET_AGENT_URL=$scheme://127.0.0.1:5000
}

# fleet_wait_metainfo DIGEST: until the origin serves the blob's metainfo (computed after commit).
fleet_wait_metainfo() {
  wait_until 60 "the origin's metainfo of $1" \
    in_ns "$FLEET_ORIGIN_NS" curl "${CURL_TLS[@]}" -sf --max-time 5 -o /dev/null "$FLEET_ORIGIN_URL/shoal/v1/blobs/$1/metainfo"
}

# fleet_agents_metric NAME [LABEL_MATCH]: the sum over all agents; a missing sample counts as 0
# unless no agent has the metric at all ("n/a").
fleet_agents_metric() {
  local i v sum=0 seen=0
  for ((i = 0; i < FLEET_N; i++)); do
    v=$(ns_metric "${FLEET_NS[i]}" "$FLEET_AGENT_URL" "$@") || v=n/a
    [[ $v == n/a ]] && continue
    seen=1 sum=$((sum + v))
  done
  if ((seen)); then echo "$sum"; else echo n/a; fi
}

# fleet_pull URL OUTDIR START: every host fetches URL (from inside its own namespace), its
# bytes' SHA-256 into OUTDIR/h<i>.sha256, all at the absolute time START (epoch seconds, fractional), and waits for all.
# Sets FLEET_RC[i] (curl's exit status; 22 for an HTTP status other than 200), FLEET_SECS[i]
# (completion time from START), FLEET_LATE (the latest start after START, seconds).
fleet_pull() {
  local url=$1 out=$2 start=$3 i pids=()
  _fleet_pull_script
  for ((i = 0; i < FLEET_N; i++)); do
    rm -f "$T/pull-result-$i"
    ns_bg "${FLEET_NS[i]}" "$T/pull-$i.log" bash "$T/fleet-pull.sh" "$start" "$url" "$out/h$i" "$T/pull-result-$i" "${FLEET_CA:-}"
    pids[i]=$NS_PID
  done
  for ((i = 0; i < FLEET_N; i++)); do ns_wait "${pids[i]}" || true; done
  local results=()
  for ((i = 0; i < FLEET_N; i++)); do results[i]=$T/pull-result-$i; done
  fleet_read_results "$start" "${results[@]}"
}

# fleet_read_results START RESULT...: each host's "rc began end code" file, in host order, into
# FLEET_RC FLEET_SECS FLEET_LATE (see fleet_pull); a missing or empty file is a failed pull.
fleet_read_results() {
  local start=$1 i=0 f r began end
  shift
  FLEET_RC=() FLEET_SECS=() FLEET_LATE=0
  for f in "$@"; do
    if [[ -s $f ]]; then
      read -r r began end _ <"$f"
      FLEET_RC[i]=$r
      FLEET_SECS[i]=$(awk -v s="$start" -v e="$end" 'BEGIN {printf "%.3f", e - s}')
      FLEET_LATE=$(awk -v s="$start" -v b="$began" -v l="$FLEET_LATE" 'BEGIN {d = b - s; printf "%.3f", (d > l) ? d : l}')
    else
      FLEET_RC[i]=255 FLEET_SECS[i]=nan
    fi
    i=$((i + 1))
  done
}

# fleet_verify OUTDIR DIGEST: sets FLEET_OK (how many hosts received bytes that hash to
# DIGEST, by the sums in OUTDIR/h<i>.sha256) and FLEET_BAD (the indices of the others).
fleet_verify() {
  local out=$1 digest=$2 i h
  FLEET_OK=0 FLEET_BAD=()
  for ((i = 0; i < FLEET_N; i++)); do
    h=
    [[ -s $out/h$i.sha256 ]] && h=sha256:$(cut -d' ' -f1 "$out/h$i.sha256")
    if [[ $h == "$digest" ]]; then FLEET_OK=$((FLEET_OK + 1)); else FLEET_BAD+=("$i"); fi
  done
}

# The helper each host runs: bash fleet-pull.sh START URL OUT RESULT. It sleeps until START,
# fetches URL with curl into `openssl dgst -sha256` (the sum goes to OUT.sha256), and writes
# "rc began end http_code" (epoch seconds) to RESULT; the end is when the sum is done too. A
# TERM stops both. The bytes are hashed as they arrive instead of being stored: twenty curls
# writing 2.5 GiB into a tmpfs took 17 % of this 2-core machine during a pull (the VM's first
# touch of fresh pages; `perf record -a`), CPU that real hosts spend on their own cores.
# openssl, not sha256sum: Debian's sha256sum hashes at 0.4 GB/s here, openssl at 1.6.
_fleet_pull_script() {
  cat >"$T/fleet-pull.sh" <<'EOF'
start=$1 url=$2 out=$3 result=$4 ca=${5:-}
rm -f "$out.fifo" "$out.sha256"
mkfifo "$out.fifo"
# This script holds the FIFO open (fd 3) so the hash's open does not wait for curl's, which
# comes with curl's first byte or never; closed once curl is done, the hash sees the end.
exec 3<>"$out.fifo"
openssl dgst -sha256 -r <"$out.fifo" >"$out.sha256" 3>&- &
spid=$!
sleep "$(awk -v s="$start" -v n="$EPOCHREALTIME" 'BEGIN {d = s - n; printf "%.6f", (d > 0) ? d : 0}')"
began=$EPOCHREALTIME
curl ${ca:+--cacert "$ca"} -sS -o "$out.fifo" -w '%{http_code}' --max-time 900 "$url" >"$result.code" 3>&- &
cpid=$!
trap 'kill "$cpid" "$spid" 2>/dev/null; exit 143' TERM INT
rc=0
wait "$cpid" || rc=$?
exec 3>&-
if ! wait "$spid" && [[ $rc == 0 ]]; then rc=1; fi
end=$EPOCHREALTIME
rm -f "$out.fifo"
code=$(cat "$result.code" 2>/dev/null)
rm -f "$result.code"
[[ $rc != 0 || $code == 200 ]] || rc=22
echo "$rc $began $end ${code:-000}" >"$result"
EOF
}
