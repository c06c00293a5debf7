#!/usr/bin/env bash
# Regenerates the committed seed corpora fuzz/seeds/{open_read,header}/ from
# images made by qemu-img/qemu-io (tiny: 512-byte clusters, 64 KiB disks, a
# few KiB per file). With --large DIR it writes only the same kinds of images
# with 16 KiB clusters, plus one with extended L2 entries (which needs them),
# into DIR: 50-160 KiB each, so scripts/fuzz.sh makes them instead of git
# keeping them.
#
# Usage: fuzz/make_seeds.sh [--large DIR]
set -euo pipefail
cd "$(dirname "$0")"
large=
if [ "${1:-}" = --large ]; then large=$2; fi
for tool in qemu-img qemu-io python3; do
    command -v "$tool" >/dev/null || { echo "make_seeds.sh: $tool not found" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
q() { qemu-img "$@" >/dev/null; }
io() { qemu-io "$@" >/dev/null; }

img() { # NAME OPTIONS: a 64 KiB image with 512-byte clusters and some data
    local f=$work/$1.qcow2
    q create -f qcow2 -o "cluster_size=512,$2" "$f" 64K
    io -c 'write -P 0xab 0 1536' -c 'write -P 0x11 40000 700' "$f"
    echo "$f"
}

build() { # OUT_DIR CLUSTER_SIZE_OPTION: one image of each kind
    local out=$1 cs=$2
    mkdir -p "$out"
    local f
    # Empty images: v3, v2, 1- and 64-bit refcounts.
    q create -f qcow2 -o "$cs" "$out/empty-v3.qcow2" 64K
    q create -f qcow2 -o "$cs,compat=0.10" "$out/empty-v2.qcow2" 64K
    # Data, zero clusters, discarded clusters.
    f=$work/data.qcow2
    q create -f qcow2 -o "$cs" "$f" 64K
    io -c 'write -P 0xab 0 1536' -c 'write -P 0x11 40000 700' \
        -c 'write -z 10240 1024' -c 'write -P 7 20480 2048' -c 'discard 20480 1024' "$f"
    cp "$f" "$out/data-v3.qcow2"
    f=$work/data2.qcow2
    q create -f qcow2 -o "$cs,compat=0.10" "$f" 64K
    io -c 'write -P 0xab 0 1536' -c 'write -P 0x11 40000 700' "$f"
    cp "$f" "$out/data-v2.qcow2"
    for bits in 1 8 64; do
        f=$work/rc$bits.qcow2
        q create -f qcow2 -o "$cs,refcount_bits=$bits" "$f" 64K
        io -c 'write -P 0x5a 512 3000' "$f"
        cp "$f" "$out/refcount$bits.qcow2"
    done
    # Compressed clusters, deflate and zstd.
    local raw=$work/raw.img
    q create -f raw "$raw" 64K
    io -f raw -c 'write -P 0x33 0 8192' -c 'write -P 0x44 32768 4096' "$raw"
    q convert -c -O qcow2 -o "$cs" "$raw" "$out/compressed-zlib.qcow2"
    q convert -c -O qcow2 -o "$cs,compression_type=zstd" "$raw" "$out/compressed-zstd.qcow2"
    # An internal snapshot, then a write (copy-on-write of a shared cluster).
    f=$work/snap.qcow2
    q create -f qcow2 -o "$cs" "$f" 64K
    io -c 'write -P 1 0 2048' "$f"
    q snapshot -c s1 "$f"
    io -c 'write -P 2 512 512' "$f"
    cp "$f" "$out/snapshot.qcow2"
    # A persistent bitmap (autoclear bit 0, bitmaps extension).
    f=$work/bitmap.qcow2
    q create -f qcow2 -o "$cs" "$f" 64K
    q bitmap --add "$f" bm0
    cp "$f" "$out/bitmap.qcow2"
    # A backing file and an external data file (open must refuse both).
    q create -f qcow2 -u -o "$cs" -b base.qcow2 -F qcow2 "$out/backing.qcow2" 64K
    (cd "$work" && q create -f qcow2 -o "$cs,data_file=data.raw,data_file_raw=on" ext.qcow2 64K)
    cp "$work/ext.qcow2" "$out/data-file.qcow2"
    # Lazy refcounts, left dirty by an abort.
    f=$work/dirty.qcow2
    q create -f qcow2 -o "$cs,lazy_refcounts=on" "$f" 64K
    (qemu-io -c 'write -P 3 0 4096' -c abort "$f" >/dev/null 2>&1 || true) 2>/dev/null
    cp "$f" "$out/dirty.qcow2"
    # An odd virtual size (last cluster partial).
    q create -f qcow2 -o "$cs" "$out/odd-size.qcow2" 33280
}

if [ -n "$large" ]; then
    build "$large" cluster_size=16384
    q create -f qcow2 -o cluster_size=16384,extended_l2=on "$work/ext.qcow2" 1M
    io -c 'write -P 9 0 3000' -c 'write -z 65536 4096' -c 'write -P 8 100000 100' "$work/ext.qcow2"
    cp "$work/ext.qcow2" "$large/extended-l2.qcow2"
    exit 0
fi
rm -rf seeds/open_read seeds/header
build seeds/open_read cluster_size=512

# header: cluster 0 of each image without its trailing zeroes (decode reads
# missing bytes as zero), plus the header of a 64 KiB-cluster image (feature
# name table) and of an extended-L2 image.
mkdir -p seeds/header
q create -f qcow2 "$work/big.qcow2" 1G
q create -f qcow2 -o cluster_size=65536,extended_l2=on,compression_type=zstd "$work/extl2.qcow2" 1G
python3 - seeds/open_read seeds/header "$work/big.qcow2" "$work/extl2.qcow2" <<'PY'
import os, struct, sys
src, dst = sys.argv[1], sys.argv[2]
def put(name, data):
    cb = struct.unpack(">I", data[20:24])[0]
    head = data[: 1 << cb].rstrip(b"\0")
    open(os.path.join(dst, name), "wb").write(head)
for n in sorted(os.listdir(src)):
    put(n, open(os.path.join(src, n), "rb").read())
for p in sys.argv[3:]:
    put(os.path.basename(p), open(p, "rb").read())
PY
ls -l seeds/open_read seeds/header
