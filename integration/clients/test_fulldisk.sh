#!/usr/bin/env bash
# Disk full during a push: the registry's data dir sits on a 64 MiB tmpfs and we push a
# 100 MiB blob. Wanted: a prompt 5xx (no hang, no crash), no partial blob under blobs/,
# the registry still answers, and once the failed upload is cancelled a small push works.
# Temp data a failed upload leaves behind (outside blobs/) after its session is cancelled
# is reported as a leak and deleted by the test so the recovery checks can go on;
# FULLDISK_STRICT=1 makes such a leak a failure.
# Targets shoal (blobs at <data-dir>/blobs/sha256/<aa>/<hex>, temp files elsewhere);
# docker-registry is checked with its own layout (blobs/sha256/<aa>/<hex>/data).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
lib_init fulldisk

disk=$T/disk
mkdir -p "$disk"
mount -t tmpfs -o size=64m shoal-it-fulldisk "$disk"
on_exit "umount '$disk' 2>/dev/null || umount -l '$disk'"
data=$disk/data
start_registry_under_test "$data"

big=$T/big.bin # on /tmp, not on the small tmpfs
head -c $((100 << 20)) /dev/urandom >"$big"
big_digest=$(sha256_of "$big")
small=$T/small.bin
head -c $((1 << 20)) /dev/urandom >"$small"
small_digest=$(sha256_of "$small")

# check_no_partial_blobs: every file under a blobs/ dir must hash to the digest it is stored as.
check_no_partial_blobs() {
  local f name hex n=0
  while IFS= read -r -d '' f; do
    name=$(basename "$f")
    if [[ $name =~ ^[0-9a-f]{64}$ ]]; then hex=$name                    # shoal: .../<aa>/<hex>
    elif [[ $name == data ]]; then hex=$(basename "$(dirname "$f")")  # docker-registry: .../<hex>/data
    else die "unexpected file in a blobs/ dir (temp file where clients can see it?): $f ($(stat -c %s "$f") bytes)"
    fi
    [[ $(sha256sum "$f" | cut -d' ' -f1) == "$hex" ]] ||
      die "partial or corrupt blob: $f holds $(stat -c %s "$f") bytes not matching its name"
    n=$((n + 1))
  done < <(find "$data" -path '*/blobs/*' -type f -print0)
  log "blobs/ ok: $n complete blob file(s), none partial"
  if find "$data" -path '*/blobs/*' | grep -q "${big_digest#sha256:}"; then
    die "the big blob ${big_digest} appears under blobs/ although its upload failed"
  fi
}

LEAKED=0
# reclaim_space WHAT: after a cancelled upload the tmpfs should be nearly empty again.
reclaim_space() {
  local used
  used=$(df -k --output=used "$disk" | tail -1 | tr -d ' ')
  ((used > 16384)) || { log "$1: space reclaimed (${used} KiB used of 65536)"; return 0; }
  LEAKED=1
  log "WARNING $1: ${used} KiB of 65536 still used after cancelling the upload; left behind:"
  find "$data" -type f -size +1M -printf '  %s bytes\t%p\n' >&2
  [[ ${FULLDISK_STRICT:-0} != 1 ]] || die "$1: failed upload leaked temp data (FULLDISK_STRICT=1)"
  # Delete the big temp data ourselves so the recovery checks below still mean something.
  find "$data" -type f -size +1M -not -path '*/blobs/*' -delete
  # Space of a deleted file returns only when the last descriptor closes: allow a moment.
  for _ in $(seq 50); do
    used=$(df -k --output=used "$disk" | tail -1 | tr -d ' ')
    ((used > 16384)) || break
    sleep 0.1
  done
  if ((used > 16384)); then
    find "/proc/$REG_PID/fd" -lname "$disk/*" -printf '  fd %f -> %l\n' >&2 || true
    die "$1: still ${used} KiB used after deleting the leftovers: the registry holds deleted files open (above)"
  fi
  log "$1: deleted the leftovers, ${used} KiB used now"
}

expect_5xx() { # expect_5xx WHAT CODE CURL_RC ELAPSED
  local what=$1 code=$2 rc=$3 secs=$4
  [[ $rc != 28 ]] || die "$what: no answer within the curl timeout (hang) after ${secs}s"
  alive "$REG_PID" || die "$what: the registry process died (crash); see its log"
  [[ $code =~ ^5[0-9][0-9]$ ]] || die "$what: want a 5xx, got HTTP '$code' (curl rc $rc) after ${secs}s; body: $(head -c 500 "$T/resp-body" 2>/dev/null)"
  log "$what: HTTP $code after ${secs}s, body: $(head -c 300 "$T/resp-body" | tr '\n' ' ')"
}

# (1) POST, then PUT ?digest= with the whole 100 MiB body.
loc=$(start_upload full/disk)
start=$SECONDS
set +e
code=$(curl -sS -o "$T/resp-body" -w '%{http_code}' --max-time 120 -H 'Expect:' \
  -H 'Content-Type: application/octet-stream' -T "$big" "$(with_query "$loc" "digest=$big_digest")")
rc=$?
set -e
expect_5xx "monolithic PUT of 100 MiB onto 64 MiB" "$code" "$rc" $((SECONDS - start))
# Cancel the session (the spec way to free its temp data); 404 is fine if it is already gone.
dcode=$(http_code -X DELETE "$loc")
log "DELETE upload session: HTTP $dcode"
[[ $dcode == 204 || $dcode == 404 ]] || die "DELETE of the failed upload answered $dcode (want 204 or 404)"
check_no_partial_blobs
reclaim_space "after the failed PUT"

# (2) POST, PATCH with the 100 MiB body (streamed upload), then PUT to finish.
loc=$(start_upload full/disk)
start=$SECONDS
set +e
code=$(curl -sS -o "$T/resp-body" -D "$T/patch-headers" -w '%{http_code}' --max-time 120 -H 'Expect:' \
  -X PATCH -H 'Content-Type: application/octet-stream' -T "$big" "$loc")
rc=$?
set -e
expect_5xx "PATCH of 100 MiB onto 64 MiB" "$code" "$rc" $((SECONDS - start))
ploc=$(tr -d '\r' <"$T/patch-headers" | awk 'tolower($1)=="location:" {print $2}')
[[ -n $ploc ]] || ploc=$loc
[[ $ploc == /* ]] && ploc=$REG_URL$ploc
pcode=$(http_code -X PUT "$(with_query "$ploc" "digest=$big_digest")")
[[ $pcode != 201 ]] || die "PUT ?digest= after the failed PATCH answered 201: a blob was committed from partial data"
log "PUT after the failed PATCH: HTTP $pcode (not 201: good)"
dcode=$(http_code -X DELETE "$loc")
log "DELETE upload session: HTTP $dcode"
[[ $dcode == 204 || $dcode == 404 ]] || die "DELETE of the failed upload answered $dcode (want 204 or 404)"
check_no_partial_blobs

hcode=$(http_code -I "$REG_URL/v2/full/disk/blobs/$big_digest")
[[ $hcode == 404 ]] || die "HEAD of the never-committed big blob answered $hcode (want 404)"

# Still serving?
alive "$REG_PID" || die "registry died"
assert_eq 200 "$(http_code "$REG_URL/v2/")" "GET /v2/ after the failed pushes"

reclaim_space "after the failed PATCH"

# A small push works and reads back.
scode=$(push_blob_monolithic full/disk "$small")
assert_eq 201 "$scode" "small blob push after the disk-full failures"
curl -sf -o "$T/small.back" "$REG_URL/v2/full/disk/blobs/$small_digest" || die "GET of the small blob failed"
cmp -s "$small" "$T/small.back" || die "small blob read back differs"
check_no_partial_blobs

((LEAKED == 0)) || log "NOTE: failed uploads leaked temp data (see WARNING above)"
log "PASS"
