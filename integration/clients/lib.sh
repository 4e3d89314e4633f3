# shellcheck shell=bash
# Shared helpers for the client integration tests and benchmarks. Source it, then call
# `lib_init NAME` once. Everything a script starts (daemons, mounts, temp dirs) is
# registered with `on_exit` and undone in reverse order when the script exits, however
# it exits. Daemons are stopped by the PID we started, never by name.
#
# Environment:
#   SHOAL_BIN          shoal binary (default: $REPO/target/debug/shoal)
#   SHOAL_UNDER_TEST   "shoal" (default) or "docker-registry": what start_registry_under_test runs
#   SHOAL_ARGS         extra arguments appended to `shoal origin ...`
#   KEEP_TMP=1         keep the temp dir (logs, layouts) after the run, for debugging
#   SKOPEO_DEBUG=1     run skopeo with --debug (prints every HTTP request it makes)
#   IT_TMP_BASE        where temp dirs are created (default /tmp; keep it short, unix
#                      socket paths must stay under 108 bytes)

set -euo pipefail

LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$LIB_DIR/../.." && pwd)
SHOAL_BIN=${SHOAL_BIN:-$REPO/target/debug/shoal}
SHOAL_UNDER_TEST=${SHOAL_UNDER_TEST:-shoal}
MKIMAGE="python3 $LIB_DIR/mkimage.py"
# The Debian docker client matches the Debian daemon; /usr/local/bin/docker is newer and first on PATH.
DOCKER_CLI=/usr/bin/docker
DOCKERD=/usr/sbin/dockerd
DOCKER_REGISTRY=/usr/bin/docker-registry

# ---------------------------------------------------------------------------------------
# logging, failure, cleanup

log() { printf '[%s %s] %s\n' "$(date +%T)" "${TEST_NAME:-lib}" "$*" >&2; }
die() {
  printf '[%s %s] FAIL: %s\n' "$(date +%T)" "${TEST_NAME:-lib}" "$*" >&2
  exit 1
}

_CLEANUPS=()
_LOGS=() # daemon logs worth showing when a test fails
on_exit() { _CLEANUPS+=("$1"); }
register_log() { _LOGS+=("$1"); }

_run_cleanups() {
  local rc=$? i
  trap - EXIT
  set +e
  if [[ $rc -ne 0 && ${#_LOGS[@]} -gt 0 ]]; then
    for i in "${_LOGS[@]}"; do
      [[ -s $i ]] || continue
      printf '\n----- last 40 lines of %s -----\n' "$i" >&2
      tail -n 40 "$i" >&2
    done
  fi
  for ((i = ${#_CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${_CLEANUPS[i]}"
  done
  exit "$rc"
}

lib_init() {
  TEST_NAME=$1
  trap _run_cleanups EXIT
  # Turn signals into a normal exit so the EXIT trap does the cleanup.
  trap 'exit 130' INT
  trap 'exit 143' TERM
  [[ $(id -u) -eq 0 ]] || die "must run as root (daemons, mounts)"
  make_tmpdir
}

# T: the script's private temp dir. Removed at exit (unless KEEP_TMP=1), after anything
# still mounted below it has been unmounted, so rm -rf never descends into a live mount.
make_tmpdir() {
  T=$(mktemp -d "${IT_TMP_BASE:-/tmp}/shoal-it.XXXXXX")
  on_exit "_remove_tmpdir '$T'"
}

_remove_tmpdir() {
  local dir=$1 m
  # Deepest mounts first.
  for m in $(findmnt -rn -o TARGET | grep -F "$dir/" | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m"
  done
  if findmnt -rn -o TARGET | grep -qF "$dir/"; then
    log "not removing $dir: something is still mounted below it"
    return
  fi
  if [[ ${KEEP_TMP:-0} == 1 ]]; then
    log "kept $dir"
  else
    rm -rf "$dir"
  fi
}

# ---------------------------------------------------------------------------------------
# processes and waiting

# free_port: a free port below the kernel's ephemeral range (32768-60999), so that no
# process binding port 0 or opening a connection can take it before its user binds it.
free_port() {
  python3 -c '
import random, socket
for _ in range(1000):
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    print(p)
    break
else:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_until TIMEOUT_S DESCRIPTION CMD...: poll CMD every 0.1 s until it succeeds.
wait_until() {
  local timeout=$1 what=$2
  shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "timed out after ${timeout}s waiting for $what"
    sleep 0.1
  done
}

# PIDs stop_pid has dealt with: once reaped, the kernel may give the number to any other
# process, so start_bg's stop at exit must not signal it again.
declare -gA _STOPPED=()

# start_bg NAME LOGFILE CMD...: start CMD in the background, write $T/NAME.pid, register
# its stop at exit (skipped if stop_pid stopped it before). Sets BG_PID.
start_bg() {
  local name=$1 logf=$2
  shift 2
  "$@" >"$logf" 2>&1 &
  BG_PID=$!
  unset "_STOPPED[$BG_PID]" # a number stop_pid saw before, now our new child's
  echo "$BG_PID" >"$T/$name.pid"
  register_log "$logf"
  on_exit "_stop_bg $BG_PID $name"
}

# _stop_bg PID NAME: start_bg's stop at exit, unless stop_pid already stopped PID.
_stop_bg() { [[ -n ${_STOPPED[$1]:-} ]] || stop_pid "$@"; }

# stop_pid PID NAME [TIMEOUT_S]: SIGTERM, then SIGKILL after the timeout; waits for it to
# end. Only for PIDs we started.
stop_pid() {
  local pid=$1 name=$2 timeout=${3:-15} i
  [[ -z $pid ]] || _STOPPED[$pid]=1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < timeout * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for ${timeout}s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

alive() { kill -0 "$1" 2>/dev/null; }

# wait_ready TIMEOUT PID NAME CMD...: like wait_until, but give up at once if PID (our
# child) dies. Sets WAIT_ERR and returns 1 on failure; callers decide whether to die.
wait_ready() {
  local timeout=$1 pid=$2 name=$3 rc
  shift 3
  local deadline=$((SECONDS + timeout))
  WAIT_ERR=
  until "$@" >/dev/null 2>&1; do
    if ! alive "$pid"; then
      rc=0
      wait "$pid" 2>/dev/null || rc=$?
      WAIT_ERR="$name (pid $pid) exited with status $rc before it was ready"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      WAIT_ERR="timed out after ${timeout}s waiting for $name to be ready"
      return 1
    fi
    sleep 0.1
  done
}

# peak_rss_kib PID: VmHWM (peak resident set) of a live process, in KiB.
peak_rss_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# median_lines: the median of the numbers on stdin, one per line (the mean of the middle two
# for an even count; nan for none). The benchmarks' one median.
median_lines() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "nan"; exit} m=(NR+1)/2; print (NR%2) ? a[int(m)] : (a[m-0.5]+a[m+0.5])/2}'; }

# ---------------------------------------------------------------------------------------
# the registry under test

# CURL_TLS: extra curl flags for Shoal's own servers (make_tls_pki sets --cacert).
CURL_TLS=()
http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${CURL_TLS[@]}" "$@"; }
is_200() { [[ $(http_code "$1") == 200 ]]; }

# start_registry KIND DATA_DIR: KIND is shoal or docker-registry. Sets REG (host:port),
# REG_URL, REG_PID, REG_LOG, REG_KIND. Dies if it does not come up, unless REG_SOFT=1:
# then it logs why and returns 1 (the benchmark skips a broken shoal that way).
start_registry() {
  local kind=$1 data=$2 port
  mkdir -p "$data"
  port=$(free_port)
  REG=127.0.0.1:$port
  REG_URL=http://$REG
  REG_KIND=$kind
  REG_LOG=$T/$kind-$port.log
  case $kind in
  shoal)
    [[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN (build it with cargo build, or run with SHOAL_UNDER_TEST=docker-registry)"
    # shellcheck disable=SC2086 # SHOAL_ARGS is a word list on purpose
    start_bg "shoal-$port" "$REG_LOG" "$SHOAL_BIN" origin --listen "$REG" --data-dir "$data" ${SHOAL_ARGS:-}
    REG_PID=$BG_PID
    wait_ready 30 "$REG_PID" "shoal origin on $REG" is_200 "$REG_URL/healthz" || {
      _registry_failed
      return 1
    }
    ;;
  docker-registry)
    [[ -x $DOCKER_REGISTRY ]] || die "$DOCKER_REGISTRY missing (apt-get install docker-registry)"
    local cfg=$T/docker-registry-$port.yml
    cat >"$cfg" <<EOF
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: $data
  delete:
    enabled: true
http:
  addr: $REG
EOF
    start_bg "docker-registry-$port" "$REG_LOG" "$DOCKER_REGISTRY" serve "$cfg"
    REG_PID=$BG_PID
    wait_ready 30 "$REG_PID" "docker-registry on $REG" is_200 "$REG_URL/v2/" || {
      _registry_failed
      return 1
    }
    ;;
  *) die "unknown registry kind '$kind' (shoal or docker-registry)" ;;
  esac
  log "$kind listening on $REG (pid $REG_PID, data $data, log $REG_LOG)"
}

_registry_failed() {
  [[ ${REG_SOFT:-0} == 1 ]] || die "$WAIT_ERR (log: $REG_LOG)"
  log "$WAIT_ERR; last lines of $REG_LOG:"
  tail -n 20 "$REG_LOG" >&2
  stop_pid "$REG_PID" "$REG_KIND"
}

# start_registry_under_test [DATA_DIR]: shoal, or docker-registry if SHOAL_UNDER_TEST says so.
# shellcheck disable=SC2120 # DATA_DIR is optional
start_registry_under_test() {
  start_registry "$SHOAL_UNDER_TEST" "${1:-$T/registry-data}"
}

# ---------------------------------------------------------------------------------------
# containerd and dockerd, each with all state under $T

start_containerd() {
  local d=$T/ctrd
  mkdir -p "$d"
  CONTAINERD_SOCK=$d/containerd.sock
  # Own config: the system one points plugins at /var/lib and /opt, and CRI is not needed.
  cat >"$d/config.toml" <<EOF
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$CONTAINERD_SOCK.ttrpc"
# Each namespace must download its own blobs; with the default "shared" policy a blob
# pulled in one namespace silently appears in the next and hides missing transfers.
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
EOF
  start_bg containerd "$d/containerd.log" containerd --config "$d/config.toml" \
    --root "$d/root" --state "$d/state" --address "$CONTAINERD_SOCK"
  CONTAINERD_PID=$BG_PID
  wait_ready 30 "$CONTAINERD_PID" containerd ctr --address "$CONTAINERD_SOCK" version || die "$WAIT_ERR"
  log "containerd up (pid $CONTAINERD_PID, $CONTAINERD_SOCK)"
}

ctr_() { ctr --address "$CONTAINERD_SOCK" "$@"; }

# start_dockerd: needs start_containerd first (dockerd uses it, namespace "moby").
start_dockerd() {
  [[ -n ${CONTAINERD_SOCK:-} ]] || start_containerd
  local d=$T/dkr
  mkdir -p "$d/data" "$d/exec" "$d/cli"
  DOCKER_SOCK=$d/docker.sock
  DOCKER_CONFIG=$d/cli # private client config (no stray auths or proxies)
  export DOCKER_CONFIG
  # DOCKERD_MIRRORS (e.g. http://127.0.0.1:5000): Docker Hub pulls go there first.
  local mirrors=''
  [[ -n ${DOCKERD_MIRRORS:-} ]] && mirrors=", \"registry-mirrors\": [\"$DOCKERD_MIRRORS\"]"
  cat >"$d/daemon.json" <<EOF
{ "insecure-registries": ["127.0.0.0/8"]$mirrors }
EOF
  # --ip-forward=false / --iptables=false / --bridge=none: leave the host's networking alone.
  start_bg dockerd "$d/dockerd.log" "$DOCKERD" --data-root "$d/data" --exec-root "$d/exec" \
    -H "unix://$DOCKER_SOCK" --pidfile "$d/dockerd.pid" --containerd "$CONTAINERD_SOCK" \
    --config-file "$d/daemon.json" --iptables=false --ip-forward=false --ip-masq=false --bridge=none
  DOCKERD_PID=$BG_PID
  wait_ready 60 "$DOCKERD_PID" dockerd "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" version || die "$WAIT_ERR"
  log "dockerd up (pid $DOCKERD_PID, $DOCKER_SOCK)"
}

dk() { "$DOCKER_CLI" -H "unix://$DOCKER_SOCK" "$@"; }

# ---------------------------------------------------------------------------------------
# skopeo, isolated from the machine-wide blob-info cache
#
# skopeo (as root) records "blob X exists in registry R / repo P" in
# /var/lib/containers/cache/blob-info-cache-v1.boltdb and later mounts or skips blobs based on
# it. skopeo 1.9 has no flag or env var for that path, so each call runs in a private mount
# namespace with $SKOPEO_CACHE bind-mounted over that directory: the cache lives only as
# long as the script's temp dir and nothing leaks into (or out of) the host's cache.
# `skopeo_clear_cache` empties it (benchmark rounds). The one global side effect is the
# empty mount point /var/lib/containers/cache, which skopeo itself would create anyway.

skopeo_() {
  SKOPEO_CACHE=$T/skopeo-cache
  mkdir -p "$SKOPEO_CACHE" "$T/skopeo-tmp" /var/lib/containers/cache
  local dbg=()
  [[ ${SKOPEO_DEBUG:-0} == 1 ]] && dbg=(--debug)
  # shellcheck disable=SC2016 # $0/$@ are for the inner sh
  unshare --mount --propagation private -- /bin/sh -c \
    'mount --bind "$0" /var/lib/containers/cache && shift && exec skopeo "$@"' \
    "$SKOPEO_CACHE" _ "${dbg[@]}" --insecure-policy --tmpdir "$T/skopeo-tmp" "$@"
}

skopeo_clear_cache() { rm -rf "${T:?}/skopeo-cache"/*; }

# ---------------------------------------------------------------------------------------
# images, built offline

# build_busybox_rootfs_tar OUT.tar: /bin/busybox (static) and /bin/sh -> busybox.
build_busybox_rootfs_tar() {
  local out=$1 r
  r=$(mktemp -d "$T/rootfs.XXXXXX")
  mkdir -p "$r/bin" "$r/etc" "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  ln -s busybox "$r/bin/sh"
  echo "shoal test image" >"$r/etc/motd"
  tar --numeric-owner --owner=0 --group=0 -C "$r" -cf "$out" .
  rm -rf "$r"
}

# docker_import_busybox NAME:TAG: a runnable image in the test dockerd.
docker_import_busybox() {
  local tarf=$T/busybox-rootfs.tar
  [[ -f $tarf ]] || build_busybox_rootfs_tar "$tarf"
  dk import --change 'CMD ["/bin/sh"]' --change 'ENV PATH=/bin' "$tarf" "$1" >/dev/null
}

# oci_random_image LAYOUT TAG SIZE[,SIZE...] [--raw]: prints the manifest digest.
oci_random_image() { $MKIMAGE random "$@"; }
# oci_busybox_image LAYOUT TAG: prints the manifest digest.
oci_busybox_image() { $MKIMAGE busybox "$@"; }
# oci_multiarch_image LAYOUT TAG: linux/amd64 + linux/arm64 index; prints the index digest.
oci_multiarch_image() { $MKIMAGE multiarch "$@"; }

# layout_blobs LAYOUT: every blob digest under the layout, sorted.
layout_blobs() { find "$1/blobs/sha256" -maxdepth 1 -type f -name '[0-9a-f]*' -printf 'sha256:%f\n' | sort; }

sha256_of() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }

# ---------------------------------------------------------------------------------------
# assertions

assert_eq() { # assert_eq EXPECTED ACTUAL WHAT
  [[ $1 == "$2" ]] || die "$3: expected '$1', got '$2'"
}

# ---------------------------------------------------------------------------------------
# raw Distribution API calls with curl (for tests that need exact status codes)

# start_upload REPO: POST /v2/REPO/blobs/uploads/, expects 202; prints the absolute Location.
start_upload() {
  local hdr=$T/post-headers code loc
  code=$(curl -sS -o /dev/null -D "$hdr" -w '%{http_code}' --max-time 30 "${CURL_TLS[@]}" -X POST "$REG_URL/v2/$1/blobs/uploads/")
  [[ $code == 202 ]] || die "POST /v2/$1/blobs/uploads/ answered $code (want 202): $(cat "$hdr")"
  loc=$(tr -d '\r' <"$hdr" | awk 'tolower($1)=="location:" {print $2}')
  [[ -n $loc ]] || die "POST /v2/$1/blobs/uploads/ gave no Location header"
  [[ $loc == /* ]] && loc=$REG_URL$loc
  echo "$loc"
}

# with_query URL K=V: append a query parameter.
with_query() { if [[ $1 == *\?* ]]; then echo "$1&$2"; else echo "$1?$2"; fi; }

# push_blob_monolithic REPO FILE: POST + PUT ?digest= with the body; prints the status code.
push_blob_monolithic() {
  local loc digest
  loc=$(start_upload "$1")
  digest=$(sha256_of "$2")
  curl -sS -o "$T/put-body" -w '%{http_code}' --max-time 60 "${CURL_TLS[@]}" -H 'Expect:' \
    -H 'Content-Type: application/octet-stream' -T "$2" "$(with_query "$loc" "digest=$digest")" || true
}

# ---------------------------------------------------------------------------------------
# a small Shoal cluster: one origin (seeding pieces), one tracker, K agents

# shoal_bg NAME LOGFILE ARGS...: start `$SHOAL_BIN ARGS...` like start_bg (sets BG_PID).
# make_tls_pki DIR: a cluster CA made with openssl (as an operator's own CA would be), and
# from then on every process start_shoal_cluster starts gets a certificate: the origin's
# issued with openssl too (role in the OU, names in the SAN), the tracker's and agents'
# with `shoal certs issue`. Sets TLS_DIR and CURL_TLS (trust the CA).
make_tls_pki() {
  TLS_DIR=$1
  mkdir -p "$TLS_DIR"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$TLS_DIR/ca-key.pem" 2>/dev/null
  openssl req -x509 -new -key "$TLS_DIR/ca-key.pem" -subj "/CN=Shoal test CA" -days 2 -out "$TLS_DIR/ca.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null ||
    die "openssl could not make a CA"
  CURL_TLS=(--cacert "$TLS_DIR/ca.pem")
  log "cluster CA in $TLS_DIR"
}

# tls_issue_openssl NAME ROLE: NAME.pem and NAME-key.pem in TLS_DIR, signed with openssl.
tls_issue_openssl() {
  local name=$1 role=$2 ext
  ext=$TLS_DIR/$name.ext
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$TLS_DIR/$name-key.pem" \
    -subj "/OU=shoal-$role/CN=$name" -out "$TLS_DIR/$name.csr" 2>/dev/null &&
    openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca-key.pem" \
      -CAcreateserial -days 1 -extfile "$ext" -out "$TLS_DIR/$name.pem" 2>/dev/null ||
    die "openssl could not issue $name's certificate"
}

# tls_issue NAME ROLE: NAME.pem and NAME-key.pem in TLS_DIR, from `shoal certs issue`.
tls_issue() {
  "$SHOAL_BIN" certs issue --ca "$TLS_DIR" --name "$1" --role "$2" --dns localhost --ip 127.0.0.1 >/dev/null ||
    die "shoal certs issue $1 failed"
}

# tls_flags NAME: the flags that give a process NAME's certificate and the cluster CA.
tls_flags() {
  echo --tls-cert "$TLS_DIR/$1.pem" --tls-key "$TLS_DIR/$1-key.pem" --cluster-ca "$TLS_DIR/ca.pem"
}

shoal_bg() {
  local name=$1 logf=$2
  shift 2
  [[ -x $SHOAL_BIN ]] || die "shoal binary not found at SHOAL_BIN=$SHOAL_BIN (build it with cargo build)"
  # shellcheck disable=SC2086 # SHOAL_CLUSTER_ARGS is a word list on purpose
  start_bg "$name" "$logf" "$SHOAL_BIN" "$@" ${SHOAL_CLUSTER_ARGS:-}
}

# start_shoal_cluster [K]: an origin with a peer listener, a tracker and K agents (default 1),
# each on free 127.0.0.1 ports, data under $T/cluster, logs in $T, all stopped at exit.
# Sets:
#   ORIGIN ORIGIN_URL ORIGIN_PEER ORIGIN_PID ORIGIN_LOG ORIGIN_DATA
#   TRACKER TRACKER_URL TRACKER_PID TRACKER_LOG
#   AGENTS[i] AGENT_URLS[i] AGENT_PEERS[i] AGENT_PIDS[i] AGENT_LOGS[i] AGENT_DATAS[i] (i < K)
#   AGENT AGENT_URL AGENT_PID AGENT_LOG AGENT_DATA: the first agent
#   REG REG_URL REG_PID REG_LOG REG_KIND=shoal: the origin, so registry helpers push there
# Environment: SHOAL_CLUSTER_ARGS is appended to every shoal command (e.g. --log debug);
# SHOAL_AGENT_ARGS only to the agents', SHOAL_ORIGIN_ARGS only to the origin's.
start_shoal_cluster() {
  local k=${1:-1} i port peer d scheme=http
  local root=$T/cluster tls_origin=() tls_tracker=() tls_agent=()
  mkdir -p "$root"
  if [[ -n ${TLS_DIR:-} ]]; then
    scheme=https
    tls_issue_openssl origin origin
    tls_issue tracker tracker
    read -ra tls_origin <<<"$(tls_flags origin)"
    read -ra tls_tracker <<<"$(tls_flags tracker)"
  fi

  port=$(free_port)
  peer=$(free_port)
  ORIGIN=127.0.0.1:$port
  ORIGIN_URL=$scheme://$ORIGIN
  ORIGIN_PEER=127.0.0.1:$peer
  ORIGIN_DATA=$root/origin
  ORIGIN_LOG=$T/origin-$port.log
  mkdir -p "$ORIGIN_DATA"
  # shellcheck disable=SC2086 # SHOAL_ORIGIN_ARGS is a word list on purpose
  shoal_bg "origin-$port" "$ORIGIN_LOG" origin --listen "$ORIGIN" --peer-listen "$ORIGIN_PEER" --data-dir "$ORIGIN_DATA" \
    "${tls_origin[@]}" ${SHOAL_ORIGIN_ARGS:-}
  ORIGIN_PID=$BG_PID
  wait_ready 30 "$ORIGIN_PID" "shoal origin on $ORIGIN" is_200 "$ORIGIN_URL/healthz" || die "$WAIT_ERR (log: $ORIGIN_LOG)"
  log "origin on $ORIGIN, peers $ORIGIN_PEER (pid $ORIGIN_PID, log $ORIGIN_LOG)"
  REG=$ORIGIN REG_URL=$ORIGIN_URL REG_PID=$ORIGIN_PID REG_LOG=$ORIGIN_LOG REG_KIND=shoal

  port=$(free_port)
  TRACKER=127.0.0.1:$port
  TRACKER_URL=$scheme://$TRACKER
  TRACKER_LOG=$T/tracker-$port.log
  shoal_bg "tracker-$port" "$TRACKER_LOG" tracker --listen "$TRACKER" --origin "$ORIGIN_URL" "${tls_tracker[@]}"
  TRACKER_PID=$BG_PID
  wait_ready 30 "$TRACKER_PID" "shoal tracker on $TRACKER" is_200 "$TRACKER_URL/healthz" || die "$WAIT_ERR (log: $TRACKER_LOG)"
  log "tracker on $TRACKER (pid $TRACKER_PID, log $TRACKER_LOG)"

  AGENTS=() AGENT_URLS=() AGENT_PEERS=() AGENT_PIDS=() AGENT_LOGS=() AGENT_DATAS=()
  for ((i = 0; i < k; i++)); do
    port=$(free_port)
    peer=$(free_port)
    d=$root/agent$i
    mkdir -p "$d"
    AGENTS[i]=127.0.0.1:$port
    AGENT_URLS[i]=$scheme://127.0.0.1:$port
    AGENT_PEERS[i]=127.0.0.1:$peer
    AGENT_DATAS[i]=$d
    AGENT_LOGS[i]=$T/agent$i-$port.log
    if [[ -n ${TLS_DIR:-} ]]; then
      tls_issue "agent$i" agent
      read -ra tls_agent <<<"$(tls_flags "agent$i")"
    fi
    # shellcheck disable=SC2086 # SHOAL_AGENT_ARGS is a word list on purpose
    shoal_bg "agent$i-$port" "${AGENT_LOGS[i]}" agent --listen "${AGENTS[i]}" --peer-listen "${AGENT_PEERS[i]}" \
      --origin "$ORIGIN_URL" --tracker "$TRACKER_URL" --data-dir "$d" "${tls_agent[@]}" ${SHOAL_AGENT_ARGS:-}
    AGENT_PIDS[i]=$BG_PID
  done
  # Start them all, then wait: agents come up in parallel.
  for ((i = 0; i < k; i++)); do
    wait_ready 30 "${AGENT_PIDS[i]}" "shoal agent $i on ${AGENTS[i]}" is_200 "${AGENT_URLS[i]}/healthz" ||
      die "$WAIT_ERR (log: ${AGENT_LOGS[i]})"
    log "agent $i on ${AGENTS[i]}, peers ${AGENT_PEERS[i]} (pid ${AGENT_PIDS[i]}, log ${AGENT_LOGS[i]})"
  done
  # shellcheck disable=SC2034 # for the scripts that source this file
  AGENT=${AGENTS[0]:-} AGENT_URL=${AGENT_URLS[0]:-} AGENT_PID=${AGENT_PIDS[0]:-}
  # shellcheck disable=SC2034
  AGENT_LOG=${AGENT_LOGS[0]:-} AGENT_DATA=${AGENT_DATAS[0]:-}
}

# require_shoal_under_test: the agent tests need shoal's origin (metainfo, seeding); with
# SHOAL_UNDER_TEST=docker-registry they skip (exit 0) instead of testing nothing useful.
require_shoal_under_test() {
  if [[ $SHOAL_UNDER_TEST != shoal ]]; then
    log "SKIP: needs SHOAL_UNDER_TEST=shoal (agent, tracker and a seeding origin)"
    exit 0
  fi
}

# metric URL NAME [LABEL_MATCH]: the sum of every sample of metric NAME at URL/metrics whose
# label set contains LABEL_MATCH (e.g. 'source="origin"'); 0 if there is none.
metric() {
  local url=$1 name=$2 match=${3:-}
  curl -sf --max-time 5 "${CURL_TLS[@]}" "$url/metrics" | awk -v n="$name" -v m="$match" '
    /^#/ { next }
    { key = $1; base = key; sub(/\{.*/, "", base) }
    base == n && (m == "" || index(key, m) > 0) { s += $2 }
    END { printf "%.0f\n", s }' # not %d: mawk clamps that at 2^31 - 1
}

# agent_received AGENT_URL: piece bytes the agent received, from peers and origins together.
agent_received() { metric "$1" shoal_agent_received_bytes_total; }

# agent_requests AGENT_URL [LABEL_MATCH]: registry requests the agent answered.
agent_requests() { metric "$1" shoal_agent_http_requests_total "${2:-}"; }

# preheat AGENT_URL IMAGE [PLATFORM] > NDJSON: POST /v1/preheat and print the event lines.
preheat() {
  local body
  if [[ -n ${3:-} ]]; then
    body=$(jq -cn --arg i "$2" --arg p "$3" '{image: $i, platform: $p}')
  else
    body=$(jq -cn --arg i "$2" '{image: $i}')
  fi
  curl -sS -N --max-time 300 "${CURL_TLS[@]}" -X POST -H 'Content-Type: application/json' --data "$body" "$1/v1/preheat"
}

# ctr_hosts_dir DIR UPSTREAM MIRROR_URL [CA_FILE]: a containerd hosts dir where UPSTREAM
# (host:port) has a closed port as its server (nothing but the mirror can answer) and
# MIRROR_URL as a pull/resolve mirror, trusted through CA_FILE if given.
ctr_hosts_dir() {
  local dir=$1 upstream=$2 mirror=$3 ca=${4:-}
  mkdir -p "$dir/$upstream"
  cat >"$dir/$upstream/hosts.toml" <<EOF
server = "http://127.0.0.1:9"

[host."$mirror"]
  capabilities = ["pull", "resolve"]
EOF
  if [[ -n $ca ]]; then echo "  ca = \"$ca\"" >>"$dir/$upstream/hosts.toml"; fi
}

# ---------------------------------------------------------------------------------------
# an origin cluster: N `shoal origin`s that place every blob and repository on R of them
#
# Every origin's id is its --listen address as written in --cluster, so all addresses are
# fixed before the first one starts. The shared secret is exported as SHOAL_CLUSTER_SECRET
# (random per script). Config: a [cluster] section with fast health checks (a dead origin is
# noticed in ~0.4 s), plus the lines in ORIGIN_CLUSTER_TOML (a key given there replaces the
# default one).

# origin_cluster_config FILE: write the config every cluster origin of this script uses.
origin_cluster_config() {
  local file=$1 key
  local -A defaults=([health_interval]='"200ms"' [health_fails]=2 [health_passes]=1 [repair_interval]='"1s"')
  {
    echo "[cluster]"
    for key in "${!defaults[@]}"; do
      grep -qE "^[[:space:]]*${key}[[:space:]]*=" <<<"${ORIGIN_CLUSTER_TOML:-}" || echo "$key = ${defaults[$key]}"
    done
    [[ -z ${ORIGIN_CLUSTER_TOML:-} ]] || printf '%s\n' "$ORIGIN_CLUSTER_TOML"
  } >"$file"
}

# start_origin_cluster N [R] [RUNNING]: N origins on free ports of $OC_HOST (default 127.0.0.1;
# '[::1]' for IPv6), all listed in each
# one's --cluster, --replicas R (default 2); only the first RUNNING (default N) are started
# (the others are down for the rest until `start_cluster_origin I`). Data under $T/oc/I, or
# $OC_DATA_BASE/I when that is set (benchmarks keep data off /tmp).
# Sets OC_N OC_R OC_LIST OC_IDS[] OC_URLS[] OC_DATAS[] OC_PIDS[] OC_LOGS[]; REG/REG_URL point
# at origin 0 so the registry helpers push there.
start_origin_cluster() {
  local n=$1 running=${3:-$1} i port
  OC_N=$n OC_R=${2:-2}
  SHOAL_CLUSTER_SECRET=it-secret-$RANDOM$RANDOM$RANDOM
  export SHOAL_CLUSTER_SECRET
  OC_IDS=() OC_URLS=() OC_DATAS=() OC_PIDS=() OC_LOGS=()
  for ((i = 0; i < n; i++)); do
    port=$(free_port)
    while [[ " ${OC_IDS[*]} " == *":$port "* ]]; do port=$(free_port); done
    OC_IDS[i]=${OC_HOST:-127.0.0.1}:$port
    OC_URLS[i]=http://${OC_HOST:-127.0.0.1}:$port
    OC_DATAS[i]=${OC_DATA_BASE:-$T/oc}/$i
  done
  OC_LIST=$(IFS=,; echo "${OC_IDS[*]}")
  mkdir -p "$T/oc"
  origin_cluster_config "$T/oc/config.toml"
  for ((i = 0; i < running; i++)); do _spawn_cluster_origin "$i"; done
  for ((i = 0; i < running; i++)); do _wait_cluster_origin "$i"; done
  wait_cluster_up "$running"
  REG=${OC_IDS[0]} REG_URL=${OC_URLS[0]} REG_PID=${OC_PIDS[0]} REG_LOG=${OC_LOGS[0]} REG_KIND=shoal
}

_spawn_cluster_origin() {
  local i=$1 id=${OC_IDS[$1]}
  mkdir -p "${OC_DATAS[i]}"
  OC_LOGS[i]=$T/oc/origin$i-$((${#_LOGS[@]})).log # a new log per start: restarts keep the old one
  shoal_bg "origin$i-${id##*:}" "${OC_LOGS[i]}" origin --listen "$id" --peer-listen "${OC_HOST:-127.0.0.1}:0" \
    --data-dir "${OC_DATAS[i]}" --config "$T/oc/config.toml" --cluster "$OC_LIST" --replicas "$OC_R"
  OC_PIDS[i]=$BG_PID
}

_wait_cluster_origin() {
  local i=$1
  wait_ready 30 "${OC_PIDS[i]}" "cluster origin $i on ${OC_IDS[i]}" is_200 "${OC_URLS[i]}/healthz" ||
    die "$WAIT_ERR (log: ${OC_LOGS[i]})"
  log "cluster origin $i on ${OC_IDS[i]} (pid ${OC_PIDS[i]}, data ${OC_DATAS[i]}, log ${OC_LOGS[i]})"
}

# start_cluster_origin I: start (again) origin I of the cluster on its address, data and config.
start_cluster_origin() {
  _spawn_cluster_origin "$1"
  _wait_cluster_origin "$1"
}

# oc_admin METHOD URL PATH: an admin API call (/shoal/v1/admin/PATH) with the bearer secret;
# prints the JSON answer, fails on a non-2xx status.
oc_admin() {
  curl -sSf --max-time 600 -X "$1" -H "Authorization: Bearer $SHOAL_CLUSTER_SECRET" "$2/shoal/v1/admin/$3"
}

# oc_up_count URL: how many members origin URL sees up.
oc_up_count() { oc_admin GET "$1" members | jq '[.[] | select(.up)] | length'; }

# wait_cluster_up COUNT: every running origin of the cluster sees COUNT members up.
wait_cluster_up() {
  local want=$1 i
  for ((i = 0; i < OC_N; i++)); do
    if [[ -z ${OC_PIDS[i]:-} ]] || ! alive "${OC_PIDS[i]}"; then continue; fi
    wait_until 30 "origin $i to see $want members up" _sees_up "${OC_URLS[i]}" "$want"
  done
}
_sees_up() { [[ $(oc_up_count "$1") == "$2" ]]; }

# oc_blob_copies DIGEST: how many cluster origins hold the blob as a file.
oc_blob_copies() {
  local hex=${1#sha256:} i n=0
  for ((i = 0; i < OC_N; i++)); do
    [[ -f ${OC_DATAS[i]}/blobs/sha256/${hex:0:2}/$hex ]] && n=$((n + 1))
  done
  echo "$n"
}
