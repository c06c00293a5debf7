//! Persistent dirty bitmaps made by `qemu-img bitmap`, written here and by
//! QEMU on twin images: the same bitmaps, flags and dirty granules, and
//! `qemu-img check` clean.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::format::bitmap::{decode_bitmap_directory, BME_FLAG_AUTO, BME_FLAG_IN_USE};
use qcow2kit::format::header::Header;
use qcow2kit::{Image, OpenOptions};
use std::collections::BTreeSet;
use std::io::IoSlice;
use std::path::Path;
use support::bitmaps::{granules, set_in_use, stored_bitmaps, StoredBitmap};
use support::{assert_check_clean, qemu_img, qemu_io};

const MIB: u64 = 1 << 20;

fn bitmaps_of(path: &Path) -> Vec<StoredBitmap> {
    stored_bitmaps(&std::fs::read(path).unwrap()).expect("bitmaps kept")
}

fn find<'a>(bms: &'a [StoredBitmap], name: &str) -> &'a StoredBitmap {
    bms.iter().find(|b| b.name == name).expect(name)
}

/// `qemu-img info`'s bitmaps (name, granularity, flags).
fn info_bitmaps(path: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", path.to_str().unwrap()]);
    support::json(&out)["format-specific"]["data"]["bitmaps"].clone()
}

/// An 8 MiB image with: `b64k` and `b512` enabled and clean, `bdis`
/// disabled with one dirty 64 KiB range, `bbad` enabled but left `in_use`.
fn base_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("base.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_img(&["bitmap", "--add", ps, "bdis"]);
    qemu_img(&["bitmap", "--add", ps, "bbad"]);
    qemu_io(&p, &["write -P 9 3M 64k".into()]);
    qemu_img(&["bitmap", "--disable", ps, "bdis"]);
    qemu_img(&["bitmap", "--add", "-g", "65536", ps, "b64k"]);
    qemu_img(&["bitmap", "--add", "-g", "512", ps, "b512"]);
    set_in_use(&p, "bbad");
    p
}

#[test]
fn io_writes_update_bitmaps_like_qemu_io() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let base = base_image(dir.path());
    let before = bitmaps_of(&base);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("qemu.qcow2");
    std::fs::copy(&base, &ours).unwrap();
    std::fs::copy(&base, &theirs).unwrap();
    // (qemu-io command, guest range it touches)
    let ops: &[(&str, u64, u64)] = &[
        ("write -P 1 100k 4k", 100 << 10, 4 << 10),
        ("write -P 2 2M 200k", 2 * MIB, 200 << 10),
        ("write -z 1M 64k", MIB, 64 << 10), // unallocated: changes nothing
        ("write -z 2049k 3k", 2 * MIB + 1024, 3 << 10),
        ("discard 2M 64k", 2 * MIB, 64 << 10),
        ("discard 6M 128k", 6 * MIB, 128 << 10), // unallocated: changes nothing
        ("writev -P 3 5M 512 1k", 5 * MIB, 1536),
        ("write -c -P 4 7M 64k", 7 * MIB, 64 << 10),
        ("write -P 5 8388096 512", 8 * MIB - 512, 512),
    ];
    let mut args: Vec<&str> = vec!["io"];
    for (c, _, _) in ops {
        args.extend(["-c", c]);
    }
    args.push(ours.to_str().unwrap());
    let out = support::ours(dir.path(), &args);
    assert_eq!(out.code, 0, "{}{}", out.out, out.err);
    qemu_io(
        &theirs,
        &ops.iter()
            .map(|(c, _, _)| c.to_string())
            .collect::<Vec<_>>(),
    );

    let (mine, qemu) = (bitmaps_of(&ours), bitmaps_of(&theirs));
    assert_eq!(mine, qemu, "stored bitmaps differ from QEMU's");
    assert_eq!(info_bitmaps(&ours), info_bitmaps(&theirs));
    for (name, g) in [("b64k", 16u8), ("b512", 9)] {
        let want: BTreeSet<u64> = ops
            .iter()
            .flat_map(|&(_, o, l)| granules(g, o, l))
            .collect();
        let b = find(&mine, name);
        assert_eq!(b.flags, BME_FLAG_AUTO, "{name}");
        assert_eq!(b.dirty.as_ref(), Some(&want), "{name}");
    }
    assert_eq!(
        find(&mine, "bdis"),
        find(&before, "bdis"),
        "disabled bitmap"
    );
    let bad = find(&mine, "bbad");
    assert_eq!(
        bad.flags,
        BME_FLAG_AUTO | BME_FLAG_IN_USE,
        "inconsistent bitmap"
    );
    assert_eq!(bad.dirty, None);
    assert_check_clean(&ours, "ours");
    assert_check_clean(&theirs, "qemu");
    // The guest data agrees too.
    assert_eq!(support::qemu_raw(&ours), support::qemu_raw(&theirs));
}

/// The granule set `want` (of `1 << g` bytes) as merged guest extents.
fn as_extents(want: &BTreeSet<u64>, g: u8) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in want {
        match out.last_mut() {
            Some((o, l)) if *o + *l == b << g => *l += 1 << g,
            _ => out.push((b << g, 1 << g)),
        }
    }
    out
}

#[test]
fn dirty_extents_query() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = base_image(dir.path());
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[1; 3000], MIB + 100).unwrap();
    img.write_zeroes(5 * MIB, 70_000, false).unwrap();
    let mut want = BTreeSet::new();
    want.extend(granules(16, MIB + 100, 3000));
    want.extend(granules(16, 5 * MIB, 70_000));
    let live = img.dirty_extents("b64k", 0, 8 * MIB).unwrap();
    assert_eq!(live, as_extents(&want, 16));
    // Clipped to the range asked for.
    assert_eq!(
        img.dirty_extents("b64k", MIB + 10, 50).unwrap(),
        vec![(MIB + 10, 50)]
    );
    // The disabled bitmap is read from the image: qemu-io's 3M+64k write.
    let dis = vec![(3 * MIB, 64 << 10)];
    assert_eq!(img.dirty_extents("bdis", 0, 8 * MIB).unwrap(), dis);
    let e = img.dirty_extents("bbad", 0, MIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'bbad' is inconsistent and cannot be used"
    );
    let e = img.dirty_extents("nope", 0, MIB).unwrap_err();
    assert_eq!(e.to_string(), "Dirty bitmap 'nope' not found");
    img.close().unwrap();
    // A read-only handle reads the stored bitmap: the same extents.
    let ro = Image::open(&p, &OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(ro.dirty_extents("b64k", 0, 8 * MIB).unwrap(), live);
    assert_eq!(ro.dirty_extents("bdis", 0, 8 * MIB).unwrap(), dis);
}

#[test]
fn library_requests_mark_bitmaps_and_survive_reopen() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("lib.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    qemu_img(&["bitmap", "--add", "-g", "4096", ps, "b4k"]);
    let mut want = BTreeSet::new();
    let touch = |want: &mut BTreeSet<u64>, o: u64, l: u64| want.extend(granules(12, o, l));
    {
        let img = Image::open(&p, &OpenOptions::new()).unwrap();
        img.write_at(&[1; 5000], 10_000).unwrap();
        touch(&mut want, 10_000, 5000);
        // Flagged in_use on disk from the first write until the store.
        assert_eq!(find(&bitmaps_of(&p), "b4k").dirty, None);
        img.write_vectored_at(&[IoSlice::new(&[2; 512]), IoSlice::new(&[3; 4096])], MIB)
            .unwrap();
        touch(&mut want, MIB, 4608);
        let r = img.reserve_write(3 * MIB + 100, 9000).unwrap();
        r.commit().unwrap();
        touch(&mut want, 3 * MIB + 100, 9000);
        img.write_compressed_at(&[4; 65536], 4 * MIB).unwrap();
        touch(&mut want, 4 * MIB, 65536);
        img.write_zeroes(5 * MIB + 7, 100, false).unwrap();
        touch(&mut want, 5 * MIB + 7, 100);
        img.discard(6 * MIB, 3 * 4096).unwrap();
        touch(&mut want, 6 * MIB, 3 * 4096);
        img.close().unwrap();
    }
    let b = find(&bitmaps_of(&p), "b4k").clone();
    assert_eq!(b.flags, BME_FLAG_AUTO);
    assert_eq!(b.dirty, Some(want.clone()));
    assert_check_clean(&p, "after the first session");
    {
        let img = Image::open(&p, &OpenOptions::new()).unwrap();
        img.write_at(&[5; 512], 7 * MIB).unwrap();
        touch(&mut want, 7 * MIB, 512);
        // The bitmap grows with the disk (as QEMU's does): the new part is
        // clean until written.
        img.resize(16 * MIB).unwrap();
        img.write_at(&[6; 100], 15 * MIB).unwrap();
        touch(&mut want, 15 * MIB, 100);
        // Dropped without close: stored all the same.
    }
    assert_eq!(find(&bitmaps_of(&p), "b4k").dirty, Some(want));
    assert_check_clean(&p, "after the second session");
    // A read-write open that writes nothing writes nothing.
    let before = std::fs::read(&p).unwrap();
    Image::open(&p, &OpenOptions::new())
        .unwrap()
        .close()
        .unwrap();
    assert!(
        before == std::fs::read(&p).unwrap(),
        "an idle open changed the file"
    );
}

/// An inconsistent bitmap's table is not read at open (QEMU skips it): a
/// bad entry there does not stop `info` or a read-write open, only `check`
/// reports it.
#[test]
fn inconsistent_bitmap_tables_are_not_read_at_open() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("iu.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
    qemu_img(&["bitmap", "--add", ps, "b0"]);
    let (_, t) = dir_and_table(&p);
    set_in_use(&p, "b0");
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[t as usize + 7] ^= 2; // a reserved bit of entry 0
    std::fs::write(&p, &bytes).unwrap();
    for args in [&["info", "iu.qcow2"][..], &["check", "iu.qcow2"]] {
        let q = support::qemu(dir.path(), "qemu-img", args);
        let o = support::ours(dir.path(), args);
        assert_eq!((o.code, &o.err), (q.code, &q.err), "{args:?}");
    }
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    let e = img.dirty_extents("b0", 0, MIB).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Bitmap 'b0' is inconsistent and cannot be used"
    );
    img.close().unwrap();
}

/// Host offset of the directory and of bitmap 0's table in `path`.
fn dir_and_table(path: &Path) -> (u64, u64) {
    let bytes = std::fs::read(path).unwrap();
    let h = Header::decode(&bytes).unwrap();
    let ext = *h.bitmaps().unwrap();
    let start = ext.bitmap_directory_offset as usize;
    let dir = &bytes[start..start + ext.bitmap_directory_size as usize];
    let e = &decode_bitmap_directory(dir, ext.nb_bitmaps, h.cluster_bits).unwrap()[0];
    (ext.bitmap_directory_offset, e.bitmap_table_offset)
}

#[test]
fn damaged_bitmaps_fail_a_read_write_open_like_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    // (what, byte offset from the directory or the table, xor mask)
    for (what, in_table, pos, mask) in [
        ("granularity", false, 17u64, 0x20u8),
        ("reserved table bit", true, 7, 2),
    ] {
        let p = dir.path().join("bad.qcow2");
        let ps = p.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", ps, "4M"]);
        qemu_img(&["bitmap", "--add", ps, "b0"]);
        let (d, t) = dir_and_table(&p);
        let at = if in_table { t } else { d } + pos;
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[at as usize] ^= mask;
        std::fs::write(&p, &bytes).unwrap();
        let q = support::qemu(dir.path(), "qemu-io", &["-c", "write 0 512", "bad.qcow2"]);
        let o = support::ours(dir.path(), &["io", "-c", "write 0 512", "bad.qcow2"]);
        assert_eq!(q.code, 1, "{what}: {}", q.err);
        assert_eq!(o.code, q.code, "{what}");
        assert_eq!(o.err, q.err, "{what}");
        // Read-only opens validate too (QEMU's open loads the bitmaps):
        // `info`, and an overlay whose backing file it is.
        let q = support::qemu(dir.path(), "qemu-img", &["info", "bad.qcow2"]);
        let o = support::ours(dir.path(), &["info", "bad.qcow2"]);
        assert_eq!((o.code, &o.err), (1, &q.err), "{what}: info");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "bad.qcow2",
            "-F",
            "qcow2",
            dir.path().join("top.qcow2").to_str().unwrap(),
            "4M",
        ]);
        let args = ["-r", "-c", "read 0 512", "top.qcow2"];
        let q = support::qemu(dir.path(), "qemu-io", &args);
        let o = support::ours(dir.path(), &[&["io"][..], &args].concat());
        assert_eq!((o.code, &o.err), (1, &q.err), "{what}: backing file");
        for ro in [false, true] {
            let e = Image::open(&p, &OpenOptions::new().read_only(ro)).unwrap_err();
            match e.inner() {
                qcow2kit::Error::Format(f) => {
                    assert_eq!(
                        f.what,
                        qcow2kit::format::Structure::BitmapDirectory,
                        "{what}"
                    );
                    assert_eq!(f.offset, Some(if in_table { t } else { d }), "{what}");
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(
            std::fs::read(&p).unwrap() == bytes,
            "{what}: a failed open wrote"
        );
    }
}

/// Four threads writing at once (in-place fast paths under the shared lock,
/// allocating writes, write-zeroes): the stored bitmap is exactly the union
/// of the granules the requests touched.
#[test]
fn concurrent_requests_all_reach_the_bitmap() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("mt.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "16M"]);
    qemu_img(&["bitmap", "--add", "-g", "8192", ps, "b8k"]);
    let img = std::sync::Arc::new(Image::open(&p, &OpenOptions::new()).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = support::Rng::new(100 + t);
                let mut touched = Vec::new();
                for _ in 0..60 {
                    let off = rng.below(16 * MIB - 70_000);
                    let len = 1 + rng.below(70_000);
                    match rng.below(3) {
                        0 => img.write_zeroes(off, len, false).unwrap(),
                        1 => {
                            let d = vec![t as u8; len as usize];
                            img.write_vectored_at(&[IoSlice::new(&d)], off).unwrap();
                        }
                        _ => img.write_at(&vec![t as u8; len as usize], off).unwrap(),
                    }
                    touched.push((off, len));
                }
                touched
            })
        })
        .collect();
    let mut want = BTreeSet::new();
    for h in handles {
        for (o, l) in h.join().unwrap() {
            want.extend(granules(13, o, l));
        }
    }
    std::sync::Arc::into_inner(img).unwrap().close().unwrap();
    assert_eq!(find(&bitmaps_of(&p), "b8k").dirty, Some(want));
    assert_check_clean(&p, "after concurrent writes");
}

/// The other way round: bitmaps added here (to an image QEMU made, with no
/// bitmaps: the header gains the extension) are listed by `qemu-img info`,
/// hold exactly our writes as QEMU decodes them, are kept and updated by
/// QEMU's own writes (and not for the disabled one), and read back here
/// with QEMU's writes included; QEMU then removes one and we see the rest.
#[test]
fn bitmaps_added_here_are_kept_and_updated_by_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let p = dir.path().join("ours.qcow2");
    let ps = p.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", ps, "8M"]);
    let mut fine = BTreeSet::new();
    let mut big = BTreeSet::new();
    let mut dis = BTreeSet::new();
    let mut def = BTreeSet::new();
    let mut touch = |o: u64, l: u64, all: bool| {
        fine.extend(granules(9, o, l));
        big.extend(granules(21, o, l));
        def.extend(granules(16, o, l));
        if all {
            dis.extend(granules(17, o, l));
        }
    };
    {
        let img = Image::open(&p, &OpenOptions::new()).unwrap();
        img.add_bitmap("fine", Some(512)).unwrap();
        img.add_bitmap("big", Some(2 * MIB)).unwrap();
        img.add_bitmap("dis", Some(128 << 10)).unwrap();
        img.add_bitmap("def", None).unwrap();
        img.write_at(&[1; 700], 3 * MIB + 100).unwrap();
        touch(3 * MIB + 100, 700, true);
        img.disable_bitmap("dis").unwrap();
        img.write_zeroes(5 * MIB, 70_000, true).unwrap();
        touch(5 * MIB, 70_000, false);
        img.discard(7 * MIB, 64 << 10).unwrap();
        touch(7 * MIB, 64 << 10, false);
        img.close().unwrap();
    }
    assert_check_clean(&p, "after our session");
    let info = info_bitmaps(&p);
    let expect = serde_json::json!([
        { "flags": ["auto"], "name": "fine", "granularity": 512 },
        { "flags": ["auto"], "name": "big", "granularity": 2097152 },
        { "flags": [], "name": "dis", "granularity": 131072 },
        { "flags": ["auto"], "name": "def", "granularity": 65536 },
    ]);
    assert_eq!(info, expect);
    let check =
        |fine: &BTreeSet<u64>, big: &BTreeSet<u64>, dis: &BTreeSet<u64>, def: &BTreeSet<u64>| {
            let b = bitmaps_of(&p);
            assert_eq!(find(&b, "fine").dirty.as_ref(), Some(fine));
            assert_eq!(find(&b, "big").dirty.as_ref(), Some(big));
            assert_eq!(find(&b, "dis").dirty.as_ref(), Some(dis));
            assert_eq!(find(&b, "def").dirty.as_ref(), Some(def));
        };
    check(&fine, &big, &dis, &def);
    // QEMU writes: its enabled bitmaps record them, the disabled one not.
    qemu_io(&p, &["write -P 3 1M 5k".into(), "write -z 6M 4k".into()]);
    fine.extend(granules(9, MIB, 5 << 10));
    fine.extend(granules(9, 6 * MIB, 4096));
    big.extend(granules(21, MIB, 5 << 10));
    big.extend(granules(21, 6 * MIB, 4096));
    def.extend(granules(16, MIB, 5 << 10));
    def.extend(granules(16, 6 * MIB, 4096));
    check(&fine, &big, &dis, &def);
    assert_check_clean(&p, "after QEMU's writes");
    // And we read what QEMU stored, from a read-only handle.
    let ro = Image::open(&p, &OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(
        ro.dirty_extents("fine", 0, 8 * MIB).unwrap(),
        as_extents(&fine, 9)
    );
    assert_eq!(
        ro.dirty_extents("big", 0, 8 * MIB).unwrap(),
        as_extents(&big, 21)
    );
    drop(ro);
    qemu_img(&["bitmap", "--remove", ps, "big"]);
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    let names: Vec<String> = img.bitmaps().unwrap().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["fine", "dis", "def"]);
    assert_eq!(
        img.dirty_extents("def", 0, 8 * MIB).unwrap(),
        as_extents(&def, 16)
    );
    img.close().unwrap();
}

/// A bitmaps extension left stale by a program without bitmap support
/// (autoclear bit 0 clear): its bitmaps are ignored, and a read-write
/// session drops the extension from the header, as QEMU does; the header
/// cluster ends up byte for byte as QEMU's twin, with the same leaks. A
/// bitmap added to such an image replaces the stale extension.
#[test]
fn stale_bitmaps_extension_is_dropped_like_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("qemu.qcow2");
    let os = ours.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", os, "8M"]);
    qemu_img(&["bitmap", "--add", os, "old"]);
    let mut bytes = std::fs::read(&ours).unwrap();
    bytes[95] &= !1; // autoclear bit 0
    std::fs::write(&ours, &bytes).unwrap();
    std::fs::write(&theirs, &bytes).unwrap();
    assert_eq!(stored_bitmaps(&bytes), None);
    let img = Image::open(&ours, &OpenOptions::new()).unwrap();
    assert!(img.bitmaps().unwrap().is_empty());
    img.write_at(&[1; 4096], 0).unwrap();
    img.close().unwrap();
    qemu_io(&theirs, &["write -P 1 0 4k".into()]);
    let (a, b) = (
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap(),
    );
    assert!(a[..65536] == b[..65536], "header clusters differ");
    let (co, ct) = (support::qemu_check(&ours), support::qemu_check(&theirs));
    assert_eq!((co.corruptions, co.leaks), (0, ct.leaks));
    assert!(ct.leaks > 0);
    // Adding a bitmap to a stale image.
    std::fs::write(&ours, &bytes).unwrap();
    let img = Image::open(&ours, &OpenOptions::new()).unwrap();
    img.add_bitmap("fresh", None).unwrap();
    img.close().unwrap();
    let b = bitmaps_of(&ours);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].name, "fresh");
    assert_eq!(b[0].dirty, Some(BTreeSet::new()));
    assert_eq!(support::qemu_check(&ours).corruptions, 0);
}

/// `amend` on images with bitmaps: a header rewrite on a handle whose
/// bitmaps are flagged in use (here `data_file`, whose longer name moves
/// the bitmaps extension in the header) still stores them exactly at close; a
/// refcount width change keeps them (QEMU agrees: check clean, same bits);
/// a downgrade to v2 succeeds as qemu-img's does, the extension left stale
/// and the image readable.
#[test]
fn amend_keeps_bitmaps_like_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = support::scratch();
    let d = dir.path();
    let p = d.join("df.qcow2");
    let ps = p.to_str().unwrap();
    let data = d.join("df.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", data.to_str().unwrap()),
        ps,
        "4M",
    ]);
    qemu_img(&["bitmap", "--add", "-g", "4k", ps, "b"]);
    // Where the bitmaps extension starts in the header cluster.
    let ext_at = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let magic = 0x2385_2875u32.to_be_bytes();
        bytes[..65536].windows(4).position(|w| w == magic).unwrap()
    };
    let before = ext_at(&p);
    let img = Image::open(&p, &OpenOptions::new()).unwrap();
    img.write_at(&[1; 5000], 10_000).unwrap();
    // A longer name for the same data file: the extension before the
    // bitmaps one grows, the bitmaps extension moves.
    let longer = format!("{}/./././././df.raw", d.to_str().unwrap());
    let opts =
        qcow2kit::options::AmendOptions::from_qemu_str(&format!("data_file={longer}")).unwrap();
    qcow2kit::amend::amend_image(&img, &opts).unwrap();
    assert_ne!(ext_at(&p), before, "the extension did not move");
    img.write_at(&[2; 100], 3 << 20).unwrap();
    // A refcount width change on the same handle: the store allocates
    // through the new structures.
    let opts = qcow2kit::options::AmendOptions::from_qemu_str("refcount_bits=8").unwrap();
    qcow2kit::amend::amend_image(&img, &opts).unwrap();
    img.write_at(&[3; 10], 2 << 20).unwrap();
    img.close().unwrap();
    assert_check_clean(&p, "after amend data_file");
    let want: BTreeSet<u64> = granules(12, 10_000, 5000)
        .chain(granules(12, 3 << 20, 100))
        .chain(granules(12, 2 << 20, 10))
        .collect();
    assert_eq!(find(&bitmaps_of(&p), "b").dirty, Some(want));
    let info = support::json(&qemu_img(&["info", "--output=json", ps]));
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        longer.as_str()
    );

    // Refcount width and downgrade, twins against qemu-img amend.
    for (opt, what) in [
        ("refcount_bits=4", "refcount width"),
        ("compat=0.10", "downgrade"),
    ] {
        let base = d.join("a.qcow2");
        let bs = base.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", bs, "4M"]);
        qemu_img(&["bitmap", "--add", bs, "b"]);
        qemu_io(&base, &["write -P 5 1M 64k".into()]);
        std::fs::copy(&base, d.join("q.qcow2")).unwrap();
        std::fs::copy(&base, d.join("o.qcow2")).unwrap();
        let q = support::qemu(d, "qemu-img", &["amend", "-o", opt, "q.qcow2"]);
        let o = support::ours(d, &["amend", "-o", opt, "o.qcow2"]);
        assert_eq!((o.code, &o.err), (q.code, &q.err), "{what}");
        assert_eq!(q.code, 0, "{what}: {q:?}");
        let (qc, oc) = (
            support::qemu_check(&d.join("q.qcow2")),
            support::qemu_check(&d.join("o.qcow2")),
        );
        assert_eq!(
            (oc.corruptions, oc.leaks),
            (qc.corruptions, qc.leaks),
            "{what}"
        );
        assert_eq!(
            stored_bitmaps(&std::fs::read(d.join("o.qcow2")).unwrap()),
            stored_bitmaps(&std::fs::read(d.join("q.qcow2")).unwrap()),
            "{what}"
        );
        assert_eq!(
            support::qemu_raw(&d.join("o.qcow2")),
            support::qemu_raw(&d.join("q.qcow2")),
            "{what}"
        );
    }
}
