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
