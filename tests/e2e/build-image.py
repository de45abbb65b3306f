#!/usr/bin/env python3
"""Builds the offline OCI image the end-to-end test imports into containerd.

No registry, no docker: an OCI image layout (oci-layout, index.json,
blobs/sha256/...) packed as one tar, with three gzip'ed layers:

  1. base:   busybox (Debian's busybox-static) with its applets as symlinks,
             /etc/passwd and /etc/group, and files that layer 3 deletes.
  2. many:   a few thousand small files, a hard link, a symlink, a file with
             an extended attribute and a file owned by uid 1000.
  3. delete: a whiteout (/etc/doomed.txt), an opaque directory (/data/opq),
             a whited-out directory (/many/d19) and a changed file.

The output is deterministic (fixed times and owners, sorted entries, gzip
without a timestamp), so the digests only change when this script or the
busybox package does. The result is cached as <cache>/e2e-image-<hash>.tar
plus a .json of facts the test checks against (image name, diff ids, chain
ids, expected file counts), <hash> being this script's sha256; an existing
pair is reused.

usage: build-image.py [--cache-dir DIR]     (default /var/cache/cowsnap-test)
Prints the path of the .tar on stdout.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile

IMAGE_NAME = "docker.io/cowsnap/e2e:1"
MTIME = 1700000000  # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"
MANY_DIRS = 20
MANY_FILES = 150
XATTR = ("user.cowsnap", "e2e")

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def log(msg):
    print(f"build-image: {msg}", file=sys.stderr, flush=True)


class Layer:
    """An uncompressed layer tar built in memory, entries in call order."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, kind, mode, uid=0, gid=0):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = MTIME
        return ti

    def dir(self, name, mode=0o755):
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name, data, mode=0o644, uid=0, gid=0, xattrs=None):
        if isinstance(data, str):
            data = data.encode()
        ti = self._info(name, tarfile.REGTYPE, mode, uid, gid)
        ti.size = len(data)
        if xattrs:
            ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name, target):
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def hardlink(self, name, target):
        ti = self._info(name, tarfile.LNKTYPE, 0o644)
        ti.linkname = target
        self.tar.addfile(ti)

    def finish(self):
        """Returns (uncompressed tar, gzip'ed tar)."""
        self.tar.close()
        raw = self.buf.getvalue()
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        return raw, gz


def fetch_busybox(work):
    """Extracts Debian's busybox-static into `work` and returns its path."""
    # Root downloads into a private temp dir: apt's _apt sandbox user could
    # not write there.
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", "busybox-static"]
    if subprocess.run(cmd, cwd=work, stdout=subprocess.DEVNULL).returncode != 0:
        log("apt-get download failed; running apt-get update and retrying")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.DEVNULL)
    debs = [f for f in os.listdir(work) if f.endswith(".deb")]
    if len(debs) != 1:
        raise SystemExit(f"build-image: expected one .deb in {work}, found {debs}")
    subprocess.run(["dpkg-deb", "-x", os.path.join(work, debs[0]), os.path.join(work, "x")], check=True)
    path = os.path.join(work, "x", "bin", "busybox")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"build-image: no busybox binary in {debs[0]}")
    return path, debs[0]


def base_layer(busybox):
    l = Layer()
    for d in ["bin", "data", "data/opq", "data/opq/sub", "dev", "etc", "proc", "sys", "var"]:
        l.dir(d)
    l.dir("root", 0o700)
    l.dir("tmp", 0o1777)
    with open(busybox, "rb") as f:
        l.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True).stdout.split()
    for a in sorted(set(applets) - {"busybox"}):
        l.symlink(f"bin/{a}", "busybox")
    l.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n")
    l.file("etc/group", "root:x:0:\nuser:x:1000:\n")
    l.file("etc/doomed.txt", "deleted by layer 3\n")
    l.file("etc/keep.txt", "v1\n")
    l.file("data/opq/old1.txt", "hidden by layer 3's opaque directory\n")
    l.file("data/opq/sub/old2.txt", "hidden by layer 3's opaque directory\n")
    return l.finish(), len(applets)


def many_layer():
    l = Layer()
    l.dir("etc")
    l.file("etc/keep.txt", "v2\n")
    l.dir("many")
    for d in range(MANY_DIRS):
        l.dir(f"many/d{d:02}")
        for f in range(MANY_FILES):
            l.file(f"many/d{d:02}/f{f:03}", f"d{d:02}/f{f:03}\n")
    l.hardlink("many/hard", "many/d00/f000")
    l.symlink("many/link", "d00/f000")
    l.file("many/xattr.txt", "has an xattr\n", xattrs=dict([XATTR]))
    l.file("many/owned.txt", "owned by uid 1000\n", mode=0o640, uid=1000, gid=1000)
    return l.finish()


def delete_layer():
    l = Layer()
    l.dir("etc")
    l.file("etc/.wh.doomed.txt", b"")
    l.file("etc/keep.txt", "v3\n")
    l.dir("data")
    l.dir("data/opq")
    l.file("data/opq/.wh..wh..opq", b"")
    l.file("data/opq/new.txt", "the only file left in /data/opq\n")
    l.dir("many")
    l.file(f"many/.wh.d{MANY_DIRS - 1:02}", b"")
    return l.finish()


def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def go_arch():
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}.get(m, m)


def build(out_tar, out_json):
    with tempfile.TemporaryDirectory(prefix="cowsnap-e2e-image.") as work:
        busybox, deb = fetch_busybox(work)
        log(f"using {deb}")
        (base_raw, base_gz), applets = base_layer(busybox)
    many_raw, many_gz = many_layer()
    del_raw, del_gz = delete_layer()
    layers = [(base_raw, base_gz, f"busybox ({deb}), /etc, files later deleted"),
              (many_raw, many_gz, f"{MANY_DIRS * MANY_FILES} small files, hard link, symlink, xattr"),
              (del_raw, del_gz, "whiteout, opaque directory, whited-out directory")]
    diff_ids = [sha256(raw) for raw, _, _ in layers]
    chain_ids = [diff_ids[0]]
    for d in diff_ids[1:]:
        chain_ids.append(sha256(f"{chain_ids[-1]} {d}".encode()))

    arch = go_arch()
    config = {
        "created": CREATED,
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            "Cmd": ["/bin/sh", "-c", "echo cowsnap-e2e default command"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": CREATED, "created_by": why} for _, _, why in layers],
    }
    config_b = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": MT_LAYER, "digest": sha256(gz), "size": len(gz)} for _, gz, _ in layers],
    }
    manifest_b = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": sha256(manifest_b),
            "size": len(manifest_b),
            "platform": {"architecture": arch, "os": "linux"},
            # containerd's importer takes this name as is; the OCI ref name
            # alone would get a generated prefix.
            "annotations": {
                "io.containerd.image.name": IMAGE_NAME,
                "org.opencontainers.image.ref.name": IMAGE_NAME.rsplit(":", 1)[1],
            },
        }],
    }
    index_b = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()

    blobs = [config_b, manifest_b] + [gz for _, gz, _ in layers]
    tmp_tar = out_tar + ".part"
    with tarfile.open(tmp_tar, "w", format=tarfile.PAX_FORMAT) as t:
        def add(name, data, kind=tarfile.REGTYPE):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mtime, ti.uname, ti.gname = kind, MTIME, "", ""
            if kind == tarfile.DIRTYPE:
                ti.mode = 0o755
                t.addfile(ti)
            else:
                ti.mode, ti.size = 0o644, len(data)
                t.addfile(ti, io.BytesIO(data))
        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", index_b)
        add("blobs", None, tarfile.DIRTYPE)
        add("blobs/sha256", None, tarfile.DIRTYPE)
        for b in sorted(blobs, key=sha256):
            add("blobs/sha256/" + sha256(b).split(":", 1)[1], b)

    # What a container of this image must see (checked by tests/e2e.rs).
    facts = {
        "image": IMAGE_NAME,
        "manifest_digest": sha256(manifest_b),
        "diff_ids": diff_ids,
        "chain_ids": chain_ids,
        "busybox_deb": deb,
        "busybox_applets": applets,
        "many_dirs_visible": MANY_DIRS - 1,
        "many_files_per_dir": MANY_FILES,
        "xattr": list(XATTR),
        "layer_sizes": [len(raw) for raw, _, _ in layers],
    }
    with open(out_json, "w") as f:
        json.dump(facts, f, indent=1, sort_keys=True)
        f.write("\n")
    os.rename(tmp_tar, out_tar)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default="/var/cache/cowsnap-test")
    args = ap.parse_args()
    with open(__file__, "rb") as f:
        key = hashlib.sha256(f.read()).hexdigest()[:16]
    os.makedirs(args.cache_dir, exist_ok=True)
    out_tar = os.path.join(args.cache_dir, f"e2e-image-{key}.tar")
    out_json = os.path.join(args.cache_dir, f"e2e-image-{key}.json")
    if os.path.exists(out_tar) and os.path.exists(out_json):
        log(f"reusing {out_tar}")
    else:
        log(f"building {out_tar}")
        # JSON first, tar (renamed into place) last: a tar means both exist.
        build(out_tar, out_json)
        log(f"built {out_tar} ({os.path.getsize(out_tar)} bytes)")
    print(out_tar)


if __name__ == "__main__":
    main()
