//! Internal snapshots against `qemu-img snapshot`: snapshots made here are
//! listed, read (`convert -l`), applied and deleted by QEMU, and QEMU's are
//! listed, read, applied and deleted here; the content after an apply is
//! the content at snapshot time and `qemu-img check` is clean after every
//! step; across cluster sizes, refcount widths and extended L2. The small
//! refcount widths refuse what would overflow, changing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
use std::path::Path;
use support::{assert_bytes_eq, assert_check_clean, qemu_img_in, qemu_raw, Rng};

/// (cluster size, refcount bits, extended L2).
const GEOMETRIES: &[(u64, u32, bool)] = &[
    (512, 16, false),
    (4096, 4, false),
    (65536, 8, false),
    (65536, 16, false),
    (16384, 32, true),
    (65536, 64, true),
    (2 << 20, 16, false),
];

/// Writes random runs (some partial clusters, some spanning tables) to
/// `img` and `model`.
fn scribble(img: &Image, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    let cs = img.cluster_size();
    for _ in 0..n {
        let len = 1 + rng.below((3 * cs).min(size / 4));
        let off = rng.below(size - len);
        let mut d = vec![0u8; len as usize];
        rng.fill(&mut d);
        img.write_at(&d, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
}

/// The guest content of snapshot `name` as QEMU reads it (`convert -l`).
fn qemu_snapshot_raw(img: &Path, name: &str) -> Vec<u8> {
    let dir = img.parent().unwrap();
    let out = dir.join("snap.raw");
    qemu_img_in(
        dir,
        &[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}

fn our_read(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(&mut v, 0).unwrap();
    v
}

fn qemu_list(img: &Path) -> Vec<(String, String)> {
    let out = qemu_img_in(
        img.parent().unwrap(),
        &["snapshot", "-l", img.to_str().unwrap()],
    );
    out.lines()
        .skip(2)
        .map(|l| {
            let mut w = l.split_whitespace();
            (w.next().unwrap().to_owned(), w.next().unwrap().to_owned())
        })
        .collect()
}

#[test]
fn ours_made_qemu_lists_reads_applies_deletes() {
    if !support::have_qemu() {
        return;
    }
    for &(cs, rb, ext) in GEOMETRIES {
        let what = format!("cluster {cs}, refcount_bits {rb}, extended_l2 {ext}");
        let dir = support::scratch();
        let path = dir.path().join("s.qcow2");
        let size = if cs >= 1 << 20 { 16 << 20 } else { 4 << 20 };
        let opts = CreateOptions::new()
            .cluster_size(cs)
            .refcount_bits(rb)
            .extended_l2(ext);
        qcow2kit::create::create(&path, &opts, size).unwrap();
        let mut rng = Rng::new(cs ^ u64::from(rb));
        let mut model = vec![0u8; size as usize];
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        scribble(&img, &mut model, &mut rng, 12);
        let first = model.clone();
        let s1 = img.snapshot_create("first").unwrap();
        assert_eq!(s1.id, "1");
        scribble(&img, &mut model, &mut rng, 12);
        img.discard(0, size / 4).unwrap();
        let cs_ = cs as usize;
        let a = 0;
        let b = (size as usize / 4) / cs_ * cs_;
        model[a..b].fill(0);
        assert_bytes_eq(&our_read(&img), &model, &format!("{what}: after COW"));
        let second = model.clone();
        let s2 = img.snapshot_create("second").unwrap();
        assert_eq!(s2.id, "2");
        scribble(&img, &mut model, &mut rng, 6);
        img.close().unwrap();
        assert_check_clean(&path, &format!("{what}: after two snapshots"));
        assert_eq!(
            qemu_list(&path),
            vec![("1".into(), "first".into()), ("2".into(), "second".into())],
            "{what}"
        );
        assert_bytes_eq(&qemu_snapshot_raw(&path, "first"), &first, &what);
        assert_bytes_eq(&qemu_snapshot_raw(&path, "second"), &second, &what);
        assert_bytes_eq(&qemu_raw(&path), &model, &what);
        // QEMU applies and deletes ours.
        let p = path.to_str().unwrap();
        qemu_img_in(dir.path(), &["snapshot", "-a", "first", p]);
        assert_check_clean(&path, &format!("{what}: after qemu apply"));
        assert_bytes_eq(&qemu_raw(&path), &first, &format!("{what}: qemu apply"));
        qemu_img_in(dir.path(), &["snapshot", "-d", "second", p]);
        assert_check_clean(&path, &format!("{what}: after qemu delete"));
        // And we go on from QEMU's state: apply, write, delete.
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_bytes_eq(&our_read(&img), &first, &what);
        let mut model = first.clone();
        scribble(&img, &mut model, &mut rng, 8);
        img.snapshot_apply("1").unwrap();
        assert_bytes_eq(&our_read(&img), &first, &format!("{what}: our apply"));
        img.snapshot_delete("first").unwrap();
        assert!(img.snapshots().is_empty());
        img.close().unwrap();
        assert_check_clean(&path, &format!("{what}: after our delete"));
        assert_bytes_eq(&qemu_raw(&path), &first, &what);
    }
}

#[test]
fn qemu_made_we_list_read_apply_delete() {
    if !support::have_qemu() {
        return;
    }
    for &(cs, rb, ext) in GEOMETRIES {
        let what = format!("cluster {cs}, refcount_bits {rb}, extended_l2 {ext}");
        let dir = support::scratch();
        let d = dir.path();
        let o = format!(
            "cluster_size={cs},refcount_bits={rb},extended_l2={}",
            if ext { "on" } else { "off" }
        );
        qemu_img_in(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &o, "q.qcow2", "4M"],
        );
        let path = d.join("q.qcow2");
        let io = |cmds: &[&str]| {
            let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
            support::qemu_io(&path, &cmds);
        };
        io(&["write -P 1 0 1M", "write -P 2 1500k 3000"]);
        qemu_img_in(d, &["snapshot", "-c", "one", "q.qcow2"]);
        let one = qemu_raw(&path);
        io(&["write -P 3 512k 1M", "discard 2M 512k"]);
        qemu_img_in(d, &["snapshot", "-c", "two", "q.qcow2"]);
        let two = qemu_raw(&path);
        io(&["write -P 4 0 64k"]);
        let now = qemu_raw(&path);

        let ro = Image::open(&path, &OpenOptions::new().read_only(true)).unwrap();
        let names: Vec<(String, String)> =
            ro.snapshots().into_iter().map(|s| (s.id, s.name)).collect();
        assert_eq!(
            names,
            vec![("1".into(), "one".into()), ("2".into(), "two".into())]
        );
        drop(ro);
        for (name, want) in [("one", &one), ("2", &two)] {
            let v = Image::open(
                &path,
                &OpenOptions::new().read_only(true).load_snapshot(name),
            )
            .unwrap();
            assert_bytes_eq(&our_read(&v), want, &format!("{what}: view of {name}"));
        }
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        assert_bytes_eq(&our_read(&img), &now, &what);
        img.snapshot_apply("one").unwrap();
        assert_bytes_eq(&our_read(&img), &one, &format!("{what}: apply one"));
        img.write_at(&[9; 3000], 100_000).unwrap();
        img.snapshot_delete("two").unwrap();
        let s3 = img.snapshot_create("three").unwrap();
        assert_eq!(s3.id, "2", "{what}: highest remaining ID + 1");
        img.close().unwrap();
        assert_check_clean(&path, &format!("{what}: after our ops"));
        let mut want = one.clone();
        want[100_000..103_000].fill(9);
        assert_bytes_eq(&qemu_raw(&path), &want, &what);
        assert_bytes_eq(&qemu_snapshot_raw(&path, "three"), &want, &what);
        assert_bytes_eq(&qemu_snapshot_raw(&path, "one"), &one, &what);
        qemu_img_in(d, &["snapshot", "-d", "one", "q.qcow2"]);
        qemu_img_in(d, &["snapshot", "-a", "three", "q.qcow2"]);
        assert_check_clean(&path, &format!("{what}: qemu after ours"));
    }
}

#[test]
fn small_refcount_widths_refuse_and_change_nothing() {
    if !support::have_qemu() {
        return;
    }
    for rb in [1u32, 2] {
        let dir = support::scratch();
        let path = dir.path().join("r.qcow2");
        let opts = CreateOptions::new().cluster_size(65536).refcount_bits(rb);
        qcow2kit::create::create(&path, &opts, 1 << 20).unwrap();
        let img = Image::open(&path, &OpenOptions::new()).unwrap();
        img.write_at(&[7; 70000], 1000).unwrap();
        let allowed = if rb == 1 { 0 } else { 2 };
        for i in 0..allowed {
            img.snapshot_create(&format!("s{i}")).unwrap();
        }
        let before = our_read(&img);
        let r = img.snapshot_create("too many");
        assert!(
            matches!(r, Err(Error::RefcountOverflow { .. })),
            "refcount_bits {rb}: {r:?}"
        );
        assert_eq!(img.snapshots().len(), allowed);
        assert_eq!(our_read(&img), before);
        // The handle still works.
        img.write_at(&[8; 512], 0).unwrap();
        img.close().unwrap();
        assert_check_clean(&path, &format!("refcount_bits {rb} after the refusal"));
        let mut want = before.clone();
        want[..512].fill(8);
        assert_bytes_eq(&qemu_raw(&path), &want, "after the refusal");
    }
    // An empty image has nothing to share: even 1-bit refcounts take one.
    let dir = support::scratch();
    let path = dir.path().join("e.qcow2");
    let opts = CreateOptions::new().refcount_bits(1);
    qcow2kit::create::create(&path, &opts, 1 << 20).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.snapshot_create("empty").unwrap();
    img.close().unwrap();
    assert_check_clean(&path, "1-bit refcounts, empty image");
}

#[test]
fn apply_restores_the_disk_size() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let path = dir.path().join("g.qcow2");
    qcow2kit::create::create(&path, &CreateOptions::new(), 1 << 20).unwrap();
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.write_at(&[5; 4096], 0).unwrap();
    img.snapshot_create("small").unwrap();
    img.resize(600 << 20).unwrap();
    img.write_at(&[6; 4096], 500 << 20).unwrap();
    img.snapshot_create("big").unwrap();
    img.snapshot_apply("small").unwrap();
    assert_eq!(img.size(), 1 << 20);
    img.close().unwrap();
    assert_check_clean(&path, "after applying the small snapshot");
    let p = path.to_str().unwrap();
    qemu_img_in(dir.path(), &["snapshot", "-a", "big", p]);
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    assert_eq!(img.size(), 600 << 20);
    let mut b = [0u8; 4096];
    img.read_at(&mut b, 500 << 20).unwrap();
    assert_eq!(b, [6; 4096]);
    img.snapshot_apply("small").unwrap();
    assert_eq!(img.size(), 1 << 20);
    img.close().unwrap();
    assert_check_clean(&path, "after applying QEMU's resize back");
}

#[test]
fn overlap_check_all_protects_snapshot_tables() {
    // With every overlap check on, the snapshot operations still pass (the
    // shared and inactive L2 tables they rewrite are theirs to write).
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let path = dir.path().join("o.qcow2");
    qcow2kit::create::create(&path, &CreateOptions::new().cluster_size(4096), 4 << 20).unwrap();
    let all = OpenOptions::from_qemu_str("overlap-check=all").unwrap();
    let img = Image::open(&path, &all).unwrap();
    img.write_at(&[1; 20000], 0).unwrap();
    img.snapshot_create("a").unwrap();
    img.write_at(&[2; 5000], 3000).unwrap();
    img.snapshot_create("b").unwrap();
    img.write_at(&[3; 5000], 9000).unwrap();
    img.snapshot_apply("a").unwrap();
    img.write_at(&[4; 100], 0).unwrap();
    img.snapshot_delete("a").unwrap();
    img.snapshot_apply("b").unwrap();
    assert!(!img.is_disabled());
    img.close().unwrap();
    assert_check_clean(&path, "overlap-check=all");
    let mut want = vec![0u8; 4 << 20];
    want[..20000].fill(1);
    want[3000..8000].fill(2);
    assert_bytes_eq(&qemu_raw(&path), &want, "content of b");
}

#[test]
fn discard_no_unref_keeps_snapshot_data() {
    // discard-no-unref keeps the host cluster and, with pass-discard-request,
    // discards its data in the file: never for a cluster shared with a
    // snapshot (the snapshot's data would be lost).
    let dir = support::scratch();
    let path = dir.path().join("n.qcow2");
    qcow2kit::create::create(&path, &CreateOptions::new().cluster_size(4096), 1 << 20).unwrap();
    let opts = OpenOptions::new()
        .discard_no_unref(true)
        .pass_discard_request(true);
    let img = Image::open(&path, &opts).unwrap();
    img.write_at(&[0x99; 64 << 10], 0).unwrap();
    img.snapshot_create("keep").unwrap();
    img.discard(0, 64 << 10).unwrap();
    assert_eq!(our_read(&img)[..64 << 10], [0u8; 64 << 10]);
    img.close().unwrap();
    let view = Image::open(
        &path,
        &OpenOptions::new().read_only(true).load_snapshot("keep"),
    )
    .unwrap();
    assert_eq!(our_read(&view)[..64 << 10], [0x99u8; 64 << 10]);
    if support::have_qemu() {
        assert_check_clean(&path, "after discard-no-unref over a snapshot");
    }
}

#[test]
fn delete_discards_freed_clusters_as_pass_discard_snapshot_says() {
    for pass in [true, false] {
        let dir = support::scratch();
        let path = dir.path().join("d.qcow2");
        qcow2kit::create::create(&path, &CreateOptions::new().cluster_size(4096), 1 << 20).unwrap();
        let opts = OpenOptions::new().pass_discard_snapshot(pass);
        let img = Image::open(&path, &opts).unwrap();
        img.write_at(&[0x77; 4096], 0).unwrap();
        let old = img.host_cluster(0).unwrap().unwrap();
        img.snapshot_create("s").unwrap();
        // Copy-on-write moves guest cluster 0; the old cluster is the
        // snapshot's alone and is freed with it.
        img.write_at(&[0x11; 4096], 0).unwrap();
        assert_ne!(img.host_cluster(0).unwrap(), Some(old));
        img.snapshot_delete("s").unwrap();
        img.close().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let freed = &bytes[old as usize..old as usize + 4096];
        if pass {
            assert_eq!(freed, &[0u8; 4096][..], "pass-discard-snapshot=on");
        } else {
            assert_eq!(freed, &[0x77u8; 4096][..], "pass-discard-snapshot=off");
        }
        if support::have_qemu() {
            assert_check_clean(&path, &format!("pass-discard-snapshot={pass}"));
        }
    }
}

#[test]
fn compressed_clusters_are_shared_and_released() {
    // Compressed clusters (written by QEMU; several share a host cluster)
    // gain and lose references per host cluster they touch, as in QEMU's
    // qcow2_update_snapshot_refcount.
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let d = dir.path();
    let path = d.join("c.qcow2");
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "c.qcow2",
            "1M",
        ],
    );
    let cmds: Vec<String> = (0..24)
        .map(|i| format!("write -c -P {} {} 4k", i + 1, i * 4096))
        .collect();
    support::qemu_io(&path, &cmds);
    let base = qemu_raw(&path);
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.snapshot_create("c1").unwrap();
    img.write_at(&[0xee; 6000], 5000).unwrap();
    let changed = our_read(&img);
    img.snapshot_create("c2").unwrap();
    img.close().unwrap();
    assert_check_clean(&path, "two snapshots over compressed clusters");
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    img.snapshot_apply("c1").unwrap();
    assert_bytes_eq(&our_read(&img), &base, "apply c1");
    img.snapshot_delete("c1").unwrap();
    img.close().unwrap();
    assert_check_clean(&path, "after deleting c1");
    assert_bytes_eq(&qemu_snapshot_raw(&path, "c2"), &changed, "c2");
    qemu_img_in(d, &["snapshot", "-d", "c2", "c.qcow2"]);
    assert_check_clean(&path, "after QEMU deleted c2");
    assert_bytes_eq(&qemu_raw(&path), &base, "content");
}
