//! Overlap checks on every write, in the spirit of QEMU's iotest 060: an
//! active L2 entry is made to point at each kind of metadata, then a guest
//! write through it must be blocked (or, with that check disabled, go
//! through), with the corrupt bit set and the right event.

use crate::support;

use qcow2kit::options::{OverlapCheckMode, OverlapChecks};
use qcow2kit::types::MetadataKind;
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn be64(f: &File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

fn be32(f: &File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

/// Host offset of the first L2 table.
fn first_l2(path: &Path) -> u64 {
    let f = File::open(path).unwrap();
    let l1 = be64(&f, 40);
    be64(&f, l1) & 0x00ff_ffff_ffff_fe00
}

fn set_l2_entry(path: &Path, index: u64, value: u64) {
    let l2 = first_l2(path);
    let f = File::options().write(true).read(true).open(path).unwrap();
    f.write_all_at(&value.to_be_bytes(), l2 + index * 8)
        .unwrap();
}

/// A 1 MiB image (64 KiB clusters) with data at 0 and 64k, optionally a
/// snapshot and a bitmap, as qemu-img lays it out.
fn image(dir: &Path, name: &str, snapshot: bool, bitmap: bool) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    support::qemu_img(&["create", "-q", "-f", "qcow2", ps, "1M"]);
    support::qemu_io(
        &p,
        &["write -P 0x11 0 64k".into(), "write -P 0x12 64k 64k".into()],
    );
    if snapshot {
        support::qemu_img(&["snapshot", "-c", "snap1", ps]);
        // Unshare cluster 0 again so the active L2 table is COPIED.
        support::qemu_io(&p, &["write -P 0x13 0 64k".into()]);
    }
    if bitmap {
        support::qemu_img(&["bitmap", "--add", ps, "bitmap0"]);
    }
    p
}

/// Where each structure lives in such an image.
fn target(path: &Path, kind: MetadataKind) -> u64 {
    let f = File::open(path).unwrap();
    match kind {
        MetadataKind::MainHeader => 0,
        MetadataKind::ActiveL1 => be64(&f, 40),
        MetadataKind::ActiveL2 => first_l2(path),
        MetadataKind::RefcountTable => be64(&f, 48),
        MetadataKind::RefcountBlock => be64(&f, be64(&f, 48)),
        MetadataKind::SnapshotTable => be64(&f, 64),
        MetadataKind::InactiveL1 => be64(&f, be64(&f, 64)),
        MetadataKind::InactiveL2 => {
            let sl1 = be64(&f, be64(&f, 64));
            be64(&f, sl1) & 0x00ff_ffff_ffff_fe00
        }
        MetadataKind::BitmapDirectory => {
            // Walk the header extensions for the bitmaps extension.
            let mut pos = u64::from(be32(&f, 100));
            loop {
                let t = be32(&f, pos);
                let len = u64::from(be32(&f, pos + 4));
                if t == 0x2385_2875 {
                    break be64(&f, pos + 8 + 16);
                }
                assert_ne!(t, 0, "no bitmaps extension");
                pos += 8 + len.div_ceil(8) * 8;
            }
        }
    }
}

fn corrupt_bit(path: &Path) -> bool {
    let f = File::open(path).unwrap();
    be64(&f, 72) & 2 != 0
}

struct Outcome {
    blocked: bool,
    events: Vec<Event>,
}

fn attempt(path: &Path, opts: &OpenOptions, host: u64) -> Outcome {
    let img = Image::open(path, opts).expect("open rw");
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    img.on_event(move |e| ev.lock().unwrap().push(e.clone()));
    // Write through guest cluster 1, whose entry now points at `host`.
    let r = img.write_at(&[0x77; 4096], 64 << 10);
    let blocked = match r {
        Ok(()) => false,
        Err(Error::OverlapPrevented { offset, .. }) => {
            assert_eq!(offset, host, "the event is about the attempted write");
            // Every later request fails until reopened.
            let mut b = [0u8; 512];
            assert!(matches!(img.read_at(&mut b, 0), Err(Error::MediumGone)));
            assert!(matches!(img.write_at(&b, 0), Err(Error::MediumGone)));
            true
        }
        Err(e) => panic!("unexpected error {e:?}"),
    };
    drop(img);
    let events = events.lock().unwrap().clone();
    Outcome { blocked, events }
}

fn modes_enabling(kind: MetadataKind) -> Vec<(String, OpenOptions, bool)> {
    let mut v = Vec::new();
    for mode in [
        OverlapCheckMode::None,
        OverlapCheckMode::Constant,
        OverlapCheckMode::Cached,
        OverlapCheckMode::All,
    ] {
        let checks = OverlapChecks::from_mode(mode);
        v.push((
            format!("overlap-check={}", mode.as_str()),
            OpenOptions::new().overlap_check(checks),
            checks.enabled(kind),
        ));
    }
    // Template plus a flag that flips exactly this kind.
    let s = format!(
        "overlap-check.template=none,overlap-check.{}=on",
        kind.option_name()
    );
    v.push((s.clone(), OpenOptions::from_qemu_str(&s).unwrap(), true));
    let s = format!(
        "overlap-check.template=all,overlap-check.{}=off",
        kind.option_name()
    );
    v.push((s.clone(), OpenOptions::from_qemu_str(&s).unwrap(), false));
    v
}

fn scenario(kind: MetadataKind) {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let snap = matches!(
        kind,
        MetadataKind::SnapshotTable | MetadataKind::InactiveL1 | MetadataKind::InactiveL2
    );
    let bitmap = kind == MetadataKind::BitmapDirectory;
    for (i, (label, opts, enabled)) in modes_enabling(kind).into_iter().enumerate() {
        let p = image(dir.path(), &format!("i{i}.qcow2"), snap, bitmap);
        let host = target(&p, kind);
        if kind == MetadataKind::MainHeader {
            // An L2 entry with offset 0 means "unallocated"; instead make the
            // allocator hand out cluster 0 by zeroing its refcount (as QEMU's test does).
            let f = File::options().write(true).read(true).open(&p).unwrap();
            let rb = be64(&f, be64(&f, 48));
            f.write_all_at(&[0, 0], rb).unwrap();
            set_l2_entry(&p, 1, 0);
        } else {
            set_l2_entry(&p, 1, 0x8000_0000_0000_0000 | host);
        }
        let out = attempt(&p, &opts, host);
        assert_eq!(out.blocked, enabled, "{kind:?} under {label}");
        if enabled {
            assert_eq!(out.events.len(), 1, "{label}: one event");
            match &out.events[0] {
                Event::ImageCorrupted {
                    msg,
                    offset,
                    size,
                    fatal,
                    ..
                } => {
                    assert_eq!(
                        msg,
                        &format!(
                            "Preventing invalid write on metadata (overlaps with {})",
                            kind.qemu_name()
                        )
                    );
                    assert_eq!(*offset, Some(host));
                    assert_eq!(
                        *size,
                        Some(if kind == MetadataKind::MainHeader {
                            65536
                        } else {
                            4096
                        })
                    );
                    assert!(*fatal);
                }
                e => panic!("unexpected event {e:?}"),
            }
            assert!(corrupt_bit(&p), "{label}: corrupt bit set on disk");
            let info = support::qemu_img(&["info", "--output", "json", p.to_str().unwrap()]);
            assert!(info.contains("\"corrupt\": true"));
            assert!(matches!(
                Image::open(&p, &OpenOptions::new())
                    .as_ref()
                    .map_err(Error::inner),
                Err(Error::ImageCorrupt)
            ));
            let ro =
                Image::open(&p, &OpenOptions::new().read_only(true)).expect("read-only open works");
            let mut b = vec![0u8; 4096];
            ro.read_at(&mut b, 0).unwrap();
        } else {
            assert!(out.events.is_empty(), "{label}: no event");
            if kind != MetadataKind::MainHeader {
                // (With the header check off, the write really lands on the header.)
                assert!(!corrupt_bit(&p));
            }
        }
    }
}

#[test]
fn main_header() {
    scenario(MetadataKind::MainHeader);
}
#[test]
fn active_l1() {
    scenario(MetadataKind::ActiveL1);
}
#[test]
fn active_l2() {
    scenario(MetadataKind::ActiveL2);
}
#[test]
fn refcount_table() {
    scenario(MetadataKind::RefcountTable);
}
#[test]
fn refcount_block() {
    scenario(MetadataKind::RefcountBlock);
}
#[test]
fn snapshot_table() {
    scenario(MetadataKind::SnapshotTable);
}
#[test]
fn inactive_l1() {
    scenario(MetadataKind::InactiveL1);
}
#[test]
fn inactive_l2() {
    scenario(MetadataKind::InactiveL2);
}
#[test]
fn bitmap_directory() {
    scenario(MetadataKind::BitmapDirectory);
}
