#!/usr/bin/env bash
# Makes the reference images of the interop tests with qemu-img and qemu-io.
# Usage: make-images.sh OUTDIR
# Every command is described in testdata/README.md. Data is deterministic
# (gzip of `seq` output as "noise"), so two runs give the same guest content.
set -euo pipefail
OUT=${1:?usage: make-images.sh OUTDIR}
mkdir -p "$OUT"
cd "$OUT"

io() { # io IMAGE CMD...: run qemu-io commands on a qcow2 image
    local img=$1
    shift
    local args=()
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}
create() { qemu-img create -q -f qcow2 "$@"; }
noise() { # noise FILE FIRST BYTES: deterministic, hardly compressible bytes
    (set +o pipefail; seq "$2" $(($2 + 6000000)) | gzip -n -1 | head -c "$3" >"$1")
}
# Removes the backing-format extension that qemu-img insists on writing
# (QEMU 10 refuses to create an overlay without -F): shifts the rest of the
# extension area and the backing file name 16 bytes down (the extension is
# "qcow2" padded to 8 bytes plus its 8-byte header) and lowers
# backing_file_offset by 16.
strip_backing_fmt() {
    local img=$1
    local magic bfo bfs
    magic=$(od -An -tx1 -j112 -N4 "$img" | tr -d ' \n')
    [ "$magic" = e2792aca ] || { echo "no backing format extension at 112 in $img" >&2; exit 1; }
    bfo=$((16#$(od -An -tx1 -j8 -N8 "$img" | tr -d ' \n')))
    bfs=$((16#$(od -An -tx1 -j16 -N4 "$img" | tr -d ' \n')))
    dd if="$img" of="$img.tmp" bs=1 skip=128 count=$((bfo + bfs - 128)) status=none
    dd if="$img.tmp" of="$img" bs=1 seek=112 conv=notrunc status=none
    dd if=/dev/zero of="$img" bs=1 seek=$((bfo + bfs - 16)) count=16 conv=notrunc status=none
    printf "$(printf '%016x' $((bfo - 16)) | sed 's/../\\x&/g')" |
        dd of="$img" bs=1 seek=8 conv=notrunc status=none
    rm -f "$img.tmp"
}

M=$((1 << 20))
noise noise-a.bin 1 $((4 * M))
noise noise-b.bin 777777 $((4 * M))
(set +o pipefail; seq 1 2000000 | head -c $((2 * M)) >text.bin)

# template.raw (8 MiB): noise, a zero MiB, compressible text, noise, a hole.
truncate -s $((8 * M)) template.raw
dd if=noise-a.bin of=template.raw bs=1M count=3 conv=notrunc status=none
dd if=text.bin of=template.raw bs=1M seek=4 count=1 conv=notrunc status=none
dd if=noise-b.bin of=template.raw bs=1M seek=5 count=2 conv=notrunc status=none
dd if=text.bin of=template.raw bs=1 seek=$((7 * M + 4096)) count=777 conv=notrunc status=none

# 1. Cluster sizes x versions: converted from the template, then partial
#    writes, zero writes and discards on top.
for cs in 512 4096 65536 2097152; do
    for v in 2 3; do
        compat=1.1
        [ $v = 2 ] && compat=0.10
        img=cs$cs-v$v.qcow2
        qemu-img convert -O qcow2 -o compat=$compat,cluster_size=$cs template.raw $img
        io $img "write -s noise-b.bin 1000 5000" \
            "write -s noise-b.bin $((3 * M - 333)) 70000" \
            "write -z $((3 * M + 512 * 1024)) 131072" \
            "write -z -u $((5 * M)) $((256 * 1024))" \
            "discard $((6 * M)) $((512 * 1024))" \
            "write -z $((7 * M + 100)) 3000"
    done
done

# 2. Refcount widths (4 KiB clusters, so that several refcount blocks exist
#    for the narrow widths' neighbours too).
for rb in 1 2 4 8 16 32 64; do
    img=rc$rb.qcow2
    create -o refcount_bits=$rb,cluster_size=4096 $img 4M
    io $img "write -s noise-a.bin 0 $((1 * M + 12345))" \
        "write -s noise-b.bin $((2 * M + 7)) 300000" \
        "discard $((512 * 1024)) $((256 * 1024))" \
        "write -s noise-b.bin $((512 * 1024 + 4096)) 4096"
done

# 3. Zero clusters, standard L2, 64 KiB clusters.
create zero.qcow2 4M
io zero.qcow2 "write -s noise-a.bin 0 $((3 * M))" \
    "write -z 65536 131072" \
    "write -z -u $((512 * 1024)) $((192 * 1024))" \
    "write -z $((1 * M + 100)) 70000" \
    "write -z $((3 * M + 65536)) 65536" \
    "write -z -u $((3 * M + 4 * 65536)) 65536"
# Zero clusters over a backing file: they must not show the backing data.
create -b noise-a.bin -F raw zero-backed.qcow2 4M
io zero-backed.qcow2 "write -z 0 131072" "write -z -u $((1 * M)) 65536" \
    "write -s noise-b.bin $((2 * M)) 65536" "write -z $((2 * M)) 65536" \
    "discard $((3 * M)) 65536"

# 4. Compressed images: zlib and zstd, several cluster sizes, then a COW
#    write into a compressed cluster and compressed writes by qemu-io.
qemu-img convert -c -O qcow2 template.raw comp-zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd template.raw comp-zstd.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=512 template.raw comp-zlib-512.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4096,compression_type=zstd template.raw comp-zstd-4k.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=2M,compression_type=zstd template.raw comp-zstd-2m.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=2M template.raw comp-zlib-2m.qcow2
io comp-zlib.qcow2 "write -s noise-b.bin $((4 * M + 1000)) 2000" "write -z $((4 * M + 65536)) 65536"
io comp-zstd.qcow2 "write -s noise-b.bin $((4 * M + 1000)) 2000" "discard $((4 * M + 131072)) 65536"
create -o compression_type=zstd comp-write.qcow2 2M
io comp-write.qcow2 "write -c -s text.bin 0 65536" "write -c -s text.bin 65536 65536" \
    "write -c -s noise-a.bin 131072 65536" "write -c -P 0x55 $((1 * M)) 65536"

# 5. Extended L2 entries: partial subcluster writes and zeroes.
for cs in 16384 65536 2097152; do
    img=extl2-$cs.qcow2
    sc=$((cs / 32))
    create -o extended_l2=on,cluster_size=$cs $img 8M
    io $img "write -s noise-a.bin 0 $sc" \
        "write -z $((4 * sc)) $sc" \
        "write -s noise-b.bin $((cs + 3 * sc + 100)) $((2 * sc))" \
        "write -z $((2 * cs)) $cs" \
        "write -s noise-a.bin $((3 * cs + sc)) $((3 * sc))" \
        "write -z -u $((3 * cs + 2 * sc)) $sc" \
        "write -s noise-b.bin $((5 * M - 10)) 20" \
        "discard $((6 * M)) $((2 * M))"
done
create -o extended_l2=on -b noise-a.bin -F raw extl2-backed.qcow2 4M
io extl2-backed.qcow2 "write -s noise-b.bin 2048 2048" "write -z 8192 2048" \
    "write -s noise-b.bin 70000 100" "write -z -u 131072 65536" "discard $((1 * M)) 65536"

# 6. A 3-deep backing chain: raw base shorter than the overlays and not
#    cluster aligned, qcow2 middle with backing format "raw", qcow2 top in a
#    subdirectory with a relative name and no backing format; plus a v2 top
#    whose discards re-expose the backing data.
mkdir -p chain/top
head -c $((3 * M + 1000)) noise-a.bin >chain/base.raw
(cd chain && create -o cluster_size=4096 -b base.raw -F raw mid.qcow2 5M)
io chain/mid.qcow2 "write -s noise-b.bin $((1 * M)) 100000" "write -z $((2 * M)) 65536" \
    "write -s text.bin $((3 * M - 5000)) 20000" "write -s text.bin $((4 * M)) 4096"
(cd chain/top && create -b ../mid.qcow2 -F qcow2 top.qcow2 8M)
strip_backing_fmt chain/top/top.qcow2
io chain/top/top.qcow2 "write -s noise-b.bin $((1 * M + 50000)) 100000" \
    "write -z $((2 * M + 65536)) 65536" "discard $((2 * M - 65536)) 65536" \
    "write -s text.bin $((6 * M)) 1000"
(cd chain && create -o compat=0.10 -b mid.qcow2 -F qcow2 top-v2.qcow2 6M)
io chain/top-v2.qcow2 "write -s noise-b.bin 0 $((1 * M))" \
    "discard 131072 65536" "write -z $((1 * M - 65536)) 65536"

# 7. External data files, with and without data_file_raw.
create -o data_file=df.data df.qcow2 4M
io df.qcow2 "write -s noise-a.bin 0 100000" "write -s noise-b.bin $((2 * M - 7)) 70000" \
    "write -z $((3 * M)) 131072" "discard 65536 65536"
create -o data_file=dfraw.data,data_file_raw=on dfraw.qcow2 4M
io dfraw.qcow2 "write -s noise-a.bin 0 100000" "write -s noise-b.bin $((2 * M - 7)) 70000" \
    "write -z 65536 65536" "write -z $((3 * M)) 4096"

# 8. Preallocated images (metadata: L2 entries point at holes; falloc:
#    allocated zeroed clusters), then partial writes.
for mode in metadata falloc; do
    create -o preallocation=$mode,cluster_size=4096 prealloc-$mode.qcow2 4M
    io prealloc-$mode.qcow2 "write -s noise-a.bin 1000 10000" "write -z $((1 * M)) 65536" \
        "discard $((2 * M)) 65536"
done

# 9. 1 TiB virtual disk with a few writes, one across an L2 boundary and one
#    on the last sector.
T=$((1 << 40))
create big.qcow2 1T
io big.qcow2 "write -s noise-a.bin 0 100000" \
    "write -s noise-b.bin $((T / 2 - 3000)) 6000" \
    "write -z $((300 << 30)) $((1 * M))" \
    "write -s noise-a.bin $((T - 512)) 512"

rm -f template.raw text.bin
