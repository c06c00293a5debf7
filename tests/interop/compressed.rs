//! Compressed writes against QEMU: images written with
//! `Image::write_compressed_at` read back bit-identical in QEMU, check
//! clean, and map like the same writes done by `qemu-io write -c` (zlib
//! and zstd, several cluster sizes, standard and extended L2).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support;

use qcow2kit::{Error, Image, OpenOptions};
use support::{assert_check_clean, qemu_img_in, qemu_io, qemu_map, qemu_raw, Rng};

/// What one cluster of the test pattern holds.
fn cluster_fill(k: u64, cs: u64, rng: &mut Rng) -> Vec<u8> {
    match k % 4 {
        0 => vec![(k + 1) as u8; cs as usize],
        1 => vec![0; cs as usize],
        2 => (0..cs).map(|_| rng.next_u64() as u8).collect(), // incompressible
        _ => (0..cs).map(|i| (i / 7 + k) as u8).collect(),
    }
}

#[test]
fn compressed_writes_read_back_in_qemu_and_check_clean() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rng = Rng::new(16);
    for ctype in ["zlib", "zstd"] {
        for (cs, ext) in [
            (512u64, false),
            (4096, false),
            (65536, false),
            (65536, true),
        ] {
            // Not a multiple of the cluster size: the last cluster is partial.
            let size = cs * 40 + 512 * u64::from(cs > 512);
            let name = format!("c-{ctype}-{cs}-{ext}.qcow2");
            let opts = format!(
                "compression_type={ctype},cluster_size={cs},extended_l2={}",
                if ext { "on" } else { "off" }
            );
            qemu_img_in(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opts,
                    &name,
                    &size.to_string(),
                ],
            );
            let path = d.join(&name);
            let mut model = vec![0u8; size as usize];
            {
                let img = Image::open(&path, &OpenOptions::new()).unwrap();
                let clusters = size.div_ceil(cs);
                // Two multi-cluster requests and the partial tail alone.
                let mut buf = Vec::new();
                for k in 0..clusters {
                    buf.extend(cluster_fill(k, cs, &mut rng));
                }
                buf.truncate(size as usize);
                let split = (clusters / 2 * cs) as usize;
                let tail = ((clusters - 1) * cs) as usize;
                img.write_compressed_at(&buf[..split], 0).unwrap();
                img.write_compressed_at(&buf[split..tail], split as u64)
                    .unwrap();
                img.write_compressed_at(&buf[tail..], tail as u64).unwrap();
                model.copy_from_slice(&buf);
                // QEMU's refusals.
                assert!(matches!(
                    img.write_compressed_at(&buf[..cs as usize], 0),
                    Err(Error::ClusterAllocated { offset: 0 })
                ));
                assert!(matches!(
                    img.write_compressed_at(&buf[..cs as usize], 1),
                    Err(Error::InvalidArgument(_))
                ));
                let mut back = vec![0u8; size as usize];
                img.read_at(&mut back, 0).unwrap();
                assert!(back == model, "{name}: read back through qcow2kit");
                img.close().unwrap();
            }
            assert!(qemu_raw(&path) == model, "{name}: read back by QEMU");
            assert_check_clean(&path, &name);
            let map = qemu_map(&path);
            let compressed = map
                .iter()
                .filter(|r| r.kind == support::Kind::Compressed)
                .map(|r| r.len)
                .sum::<u64>();
            assert!(compressed >= size / 2, "{name}: {map:?}");
        }
    }
}

/// The same pattern writes as `qemu-io write -c` give the same
/// `qemu-img map` (compressed runs, data offsets of incompressible
/// clusters, packing) and the same refcounts as checked by QEMU.
#[test]
fn compressed_layout_matches_qemu_io() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for ctype in ["zlib", "zstd"] {
        for cs in [512u64, 65536] {
            let size = cs * 16;
            let opts = format!("compression_type={ctype},cluster_size={cs}");
            let mut maps = Vec::new();
            for who in ["qemu", "ours"] {
                let name = format!("{who}-{ctype}-{cs}.qcow2");
                qemu_img_in(
                    d,
                    &[
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        &opts,
                        &name,
                        &size.to_string(),
                    ],
                );
                let path = d.join(&name);
                let writes: Vec<(u8, u64, u64)> = vec![
                    (1, 0, 2 * cs),
                    (0, 3 * cs, cs),
                    (7, 5 * cs, 4 * cs),
                    (9, 15 * cs, cs),
                ];
                if who == "qemu" {
                    let cmds: Vec<String> = writes
                        .iter()
                        .map(|(p, o, l)| format!("write -c -P {p} {o} {l}"))
                        .collect();
                    qemu_io(&path, &cmds);
                } else {
                    let img = Image::open(&path, &OpenOptions::new()).unwrap();
                    for (p, o, l) in &writes {
                        img.write_compressed_at(&vec![*p; *l as usize], *o).unwrap();
                    }
                    img.close().unwrap();
                }
                assert_check_clean(&path, &name);
                maps.push((
                    qemu_img_in(d, &["map", "--output=json", &name]),
                    qemu_raw(&path),
                ));
            }
            assert_eq!(maps[0].0, maps[1].0, "{ctype} {cs}: qemu-img map");
            assert!(maps[0].1 == maps[1].1, "{ctype} {cs}: content");
        }
    }
}

/// Four threads compress and write clusters at once, racing for the same
/// guest clusters (exactly one write of each wins, the others get
/// `ClusterAllocated`) next to plain writes: the image checks clean and
/// QEMU reads what the winners wrote.
#[test]
fn concurrent_compressed_writes_check_clean() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cs = 4096u64;
    let clusters = 256u64;
    let size = cs * clusters;
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "t.qcow2",
            &size.to_string(),
        ],
    );
    let path = d.join("t.qcow2");
    let img = Image::open(&path, &OpenOptions::new()).unwrap();
    let fill = |c: u64, t: u64| -> Vec<u8> {
        (0..cs).map(|i| ((i / 9 + c * 7 + t) % 251) as u8).collect()
    };
    let winners: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let img = &img;
                s.spawn(move || {
                    let mut won = Vec::new();
                    for k in 0..clusters {
                        // Every thread tries the even clusters (in a different
                        // order); odd clusters are raced by two threads, and
                        // every eighth is written plainly by one.
                        let c = if t % 2 == 0 { k } else { clusters - 1 - k };
                        if c % 2 == 1 && c % 4 != t * 2 % 4 + 1 {
                            continue;
                        }
                        // Plain writes succeed every time: one thread only,
                        // so the content does not depend on timing.
                        if c % 8 == 7 && t != 1 {
                            continue;
                        }
                        let data = fill(c, t);
                        let r = if c % 8 == 7 {
                            img.write_at(&data, c * cs)
                        } else {
                            img.write_compressed_at(&data, c * cs)
                        };
                        match r {
                            Ok(()) => won.push((c, t)),
                            Err(Error::ClusterAllocated { .. }) => {}
                            Err(e) => panic!("cluster {c}, thread {t}: {e}"),
                        }
                    }
                    won
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    img.close().unwrap();
    let mut model = vec![0u8; size as usize];
    let mut seen = std::collections::HashSet::new();
    for (c, t) in winners.into_iter().flatten() {
        if c % 8 != 7 {
            assert!(seen.insert(c), "cluster {c} written compressed twice");
        }
        model[(c * cs) as usize..((c + 1) * cs) as usize].copy_from_slice(&fill(c, t));
    }
    assert!(seen.len() as u64 >= clusters / 2, "{} clusters", seen.len());
    assert_check_clean(&path, "concurrent compressed writes");
    assert!(qemu_raw(&path) == model, "content read by QEMU");
}

/// `discard-no-unref` keeps the reference of a data cluster but not of a
/// compressed one (QEMU's `keep_reference` excludes compressed clusters):
/// a discard of compressed clusters frees their host clusters, as QEMU does,
/// instead of leaking them. Standard and extended L2 entries; twin images
/// made by qemu-io, the discard done by qemu-io on one and by us on the
/// other; check clean, the same map and content.
#[test]
fn discard_no_unref_frees_compressed_clusters_as_qemu() {
    if !support::have_qemu() {
        return;
    }
    for xl2 in ["off", "on"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut imgs = Vec::new();
        for who in ["qemu", "ours"] {
            let name = format!("{who}.qcow2");
            let o = format!("extended_l2={xl2}");
            qemu_img_in(d, &["create", "-q", "-f", "qcow2", "-o", &o, &name, "1M"]);
            let img = d.join(&name);
            qemu_io(
                &img,
                &[
                    "write -c -P 5 0 64k".into(),
                    "write -c -P 6 64k 64k".into(),
                    "write -P 7 128k 64k".into(),
                ],
            );
            imgs.push(img);
        }
        let out = std::process::Command::new("qemu-io")
            .current_dir(d)
            .arg("--image-opts")
            .arg("driver=qcow2,discard-no-unref=on,file.filename=qemu.qcow2")
            .args(["-c", "discard 0 192k"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let img = Image::open(&imgs[1], &OpenOptions::new().discard_no_unref(true)).unwrap();
        img.discard(0, 192 << 10).unwrap();
        img.close().unwrap();
        let what = format!("discard-no-unref over compressed clusters, extended_l2={xl2}");
        assert_check_clean(&imgs[0], &format!("{what} (qemu)"));
        assert_check_clean(&imgs[1], &format!("{what} (ours)"));
        assert_eq!(qemu_map(&imgs[1]), qemu_map(&imgs[0]), "{what}: map");
        assert!(qemu_raw(&imgs[1]) == qemu_raw(&imgs[0]), "{what}: content");
    }
}
