#!/usr/bin/env python3
"""Write OCI image layouts offline, for tests and benchmarks (no network, no registry).

  mkimage.py random    LAYOUT TAG SIZE[,SIZE...] [--raw] [--arch A]
      one image whose layers are tars each holding one file of SIZE random bytes
      (SIZE: bytes, or with suffix K/M/G, powers of 1024). --raw: the layer blob is the
      random bytes themselves (not unpackable; for pure transfer tests).
  mkimage.py busybox   LAYOUT TAG [--arch A]
      a runnable image: one tar layer with /bin/busybox (from busybox-static) and /bin/sh.
  mkimage.py multiarch LAYOUT TAG
      an image index with linux/amd64 (busybox, runnable here) and linux/arm64 (a marker
      file and some random bytes; never run, only pulled).

Layers are uncompressed (application/vnd.oci.image.layer.v1.tar), so diff_id == digest,
and `skopeo copy --preserve-digests` pushes exactly these bytes. Several TAGs may be
written into the same LAYOUT (index.json is merged). Prints the top-level digest.
"""
import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import time

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20
# Fixed mtime keeps the tar headers (and so the digests of non-random layers) stable.
EPOCH = 1700000000


class HashingWriter:
    """File object that hashes and counts everything written through it."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b):
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


class RandomReader:
    """Read-only file object yielding `size` random bytes."""

    def __init__(self, size):
        self.left = size

    def read(self, n=-1):
        if n < 0 or n > self.left:
            n = self.left
        self.left -= n
        return os.urandom(n)


class Layout:
    def __init__(self, path):
        self.path = path
        self.blobs = os.path.join(path, "blobs", "sha256")
        os.makedirs(self.blobs, exist_ok=True)
        with open(os.path.join(path, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)

    def _commit(self, tmp, digest_hex):
        os.replace(tmp, os.path.join(self.blobs, digest_hex))
        return "sha256:" + digest_hex

    def stream_blob(self, fill):
        """Call fill(fileobj) to write a blob; returns (digest, size) without reading it back."""
        tmp = os.path.join(self.blobs, ".tmp-%d-%d" % (os.getpid(), time.monotonic_ns()))
        with open(tmp, "wb") as f:
            w = HashingWriter(f)
            fill(w)
        return self._commit(tmp, w.h.hexdigest()), w.n

    def put_bytes(self, data):
        return self.stream_blob(lambda w: w.write(data))

    def put_json(self, obj):
        return self.put_bytes(json.dumps(obj, separators=(",", ":")).encode())

    def tag(self, tag, desc):
        """Record `desc` under ref name `tag` in index.json (replacing an older entry)."""
        p = os.path.join(self.path, "index.json")
        idx = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": []}
        if os.path.exists(p):
            with open(p) as f:
                idx = json.load(f)
        key = "org.opencontainers.image.ref.name"
        idx["manifests"] = [m for m in idx["manifests"] if m.get("annotations", {}).get(key) != tag]
        idx["manifests"].append(dict(desc, annotations={key: tag}))
        with open(p + ".tmp", "w") as f:
            json.dump(idx, f, indent=1)
        os.replace(p + ".tmp", p)


def tar_layer(layout, entries):
    """entries: list of (name, kind, payload): kind 'file' (payload: bytes or (reader, size)),
    'dir', 'symlink' (payload: target)."""

    def fill(w):
        # Stream mode ('w|') writes sequentially, so hashing on the way is exact.
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as t:
            for name, kind, payload in entries:
                ti = tarfile.TarInfo(name)
                ti.mtime = EPOCH
                if kind == "dir":
                    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                    t.addfile(ti)
                elif kind == "symlink":
                    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, payload, 0o777
                    t.addfile(ti)
                else:
                    if isinstance(payload, bytes):
                        reader, size = io.BytesIO(payload), len(payload)
                    else:
                        reader, size = payload
                    ti.size, ti.mode = size, 0o755
                    t.addfile(ti, reader)

    digest, size = layout.stream_blob(fill)
    return {"mediaType": MT_TAR, "digest": digest, "size": size}


def raw_layer(layout, size):
    def fill(w):
        left = size
        while left:
            n = min(CHUNK, left)
            w.write(os.urandom(n))
            left -= n

    digest, n = layout.stream_blob(fill)
    return {"mediaType": MT_TAR, "digest": digest, "size": n}


def image(layout, layers, arch, cmd=None):
    """Write config + manifest for `layers` (descriptors); returns the manifest descriptor."""
    config = {
        "created": "2023-11-14T22:13:20Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": cmd or ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "mkimage.py"} for _ in layers],
    }
    cd, cs = layout.put_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": cd, "size": cs},
        "layers": layers,
    }
    md, ms = layout.put_json(manifest)
    return {"mediaType": MT_MANIFEST, "digest": md, "size": ms}


def busybox_layer(layout, extra=()):
    with open("/bin/busybox", "rb") as f:
        bb = f.read()
    entries = [("bin", "dir", None), ("bin/busybox", "file", bb), ("bin/sh", "symlink", "busybox")]
    return tar_layer(layout, entries + list(extra))


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    s = s.strip().upper().rstrip("B").rstrip("I")
    return int(s[:-1]) * mult[s[-1]] if s and s[-1] in mult else int(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["random", "busybox", "multiarch"])
    ap.add_argument("layout")
    ap.add_argument("tag")
    ap.add_argument("sizes", nargs="?", default="")
    ap.add_argument("--raw", action="store_true")
    ap.add_argument("--arch", default="amd64")
    a = ap.parse_args()
    lay = Layout(a.layout)

    if a.kind == "random":
        sizes = [parse_size(s) for s in a.sizes.split(",") if s]
        if not sizes:
            ap.error("random needs SIZE[,SIZE...]")
        layers = []
        for i, n in enumerate(sizes):
            if a.raw:
                layers.append(raw_layer(lay, n))
            else:
                layers.append(tar_layer(lay, [("data%d.bin" % i, "file", (RandomReader(n), n))]))
        desc = image(lay, layers, a.arch, cmd=["/data0.bin"])
    elif a.kind == "busybox":
        desc = image(lay, [busybox_layer(lay)], a.arch)
    else:
        amd = image(lay, [busybox_layer(lay, [("etc", "dir", None), ("etc/platform", "file", b"linux/amd64\n")])], "amd64")
        arm_layer = tar_layer(lay, [
            ("etc", "dir", None),
            ("etc/platform", "file", b"linux/arm64\n"),
            ("etc/random.bin", "file", os.urandom(64 << 10)),
        ])
        arm = image(lay, [arm_layer], "arm64")
        index = {
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [
                dict(amd, platform={"architecture": "amd64", "os": "linux"}),
                dict(arm, platform={"architecture": "arm64", "os": "linux", "variant": "v8"}),
            ],
        }
        d, s = lay.put_json(index)
        desc = {"mediaType": MT_INDEX, "digest": d, "size": s}
    lay.tag(a.tag, desc)
    print(desc["digest"])


if __name__ == "__main__":
    sys.exit(main())
