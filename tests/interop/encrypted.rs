//! LUKS-encrypted images against QEMU: images QEMU made and wrote (several
//! ciphers, modes, IV generators and hashes) read bit-identically here;
//! what the library writes reads back in qemu-io with the key and checks
//! clean; a wrong or missing key is refused with QEMU's messages and
//! changes nothing; a damaged key slot fails while another still opens.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed unwrap is a failed test

use crate::support::{self, assert_bytes_eq, run_cmd, Rng};
use qcow2kit::crypto::{Secret, SecretStore};
use qcow2kit::{Error, Image, OpenOptions};
use std::path::Path;
use std::process::Command;

const PW: &str = "abc123";

/// The options qemu-io/qemu-img open `img` with, keyed by secret `s`.
fn image_opts(img: &Path) -> String {
    format!(
        "driver=qcow2,encrypt.key-secret=s,file.filename={}",
        img.display()
    )
}

/// Runs a QEMU tool with `--object secret,id=s,data=PW` first.
fn qemu_keyed(prog: &str, args: &[&str]) -> support::Run {
    let secret = format!("secret,id=s,data={PW}");
    let mut c = Command::new(prog);
    match args.split_first() {
        // qemu-img takes the subcommand first.
        Some((sub, rest)) if prog == "qemu-img" => {
            c.arg(sub).args(["--object", &secret]).args(rest)
        }
        _ => c.args(["--object", &secret]).args(args),
    };
    run_cmd(&mut c)
}

/// qemu-io commands on `img` with the key; panics on any failure or
/// pattern mismatch.
fn qemu_io_keyed(img: &Path, cmds: &[String]) {
    let mut args: Vec<String> = Vec::new();
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push("--image-opts".into());
    args.push(image_opts(img));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = qemu_keyed("qemu-io", &args);
    let text = format!("{}{}", r.out, r.err);
    assert!(
        r.code == 0 && !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "qemu-io {cmds:?}: {r:?}"
    );
}

/// The guest contents as QEMU sees them (`qemu-img convert` with the key).
fn qemu_contents(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("raw");
    let opts = image_opts(img);
    let r = qemu_keyed(
        "qemu-img",
        &[
            "convert",
            "--image-opts",
            &opts,
            "-O",
            "raw",
            raw.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    bytes
}

/// `qemu-img check` with the key is clean.
fn assert_qemu_check_clean(img: &Path) {
    let opts = image_opts(img);
    let r = qemu_keyed(
        "qemu-img",
        &["check", "--output=json", "--image-opts", &opts],
    );
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap_or_default();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert!(
        r.code == 0 && n("corruptions") == 0 && n("leaks") == 0 && n("check-errors") == 0,
        "qemu-img check: {r:?}"
    );
}

fn keyed(pw: &str) -> OpenOptions {
    let mut secrets = SecretStore::new();
    secrets.insert("s", Secret::new(pw));
    OpenOptions::new().secrets(secrets).key_secret("s")
}

/// `qemu-img create` of a LUKS image with `extra` encrypt options.
fn qemu_create(img: &Path, extra: &str, size: &str, more: &[&str]) {
    let o = format!("encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10{extra}");
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
    args.extend_from_slice(more);
    let name = img.to_str().unwrap();
    args.push(name);
    args.push(size);
    let r = qemu_keyed("qemu-img", &args);
    assert_eq!(r.code, 0, "{r:?}");
}

/// The cipher/mode/IV/hash combinations tested (QEMU's default first).
const COMBOS: &[&str] = &[
    "",
    ",encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1",
    ",encrypt.cipher-alg=aes-192,encrypt.hash-alg=sha512",
    ",encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
    ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
    ",encrypt.cipher-alg=aes-256,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain64",
    ",encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha512",
];

#[test]
fn qemu_written_images_read_bit_identically() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, combo) in COMBOS.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.qcow2"));
        qemu_create(&img, combo, "4M", &[]);
        qemu_io_keyed(
            &img,
            &[
                "write -P 0x5a 0 64k".into(),
                "write -P 0x11 100k 3000".into(),
                "write -P 0x22 1023k 130k".into(),
                "write -z 2M 64k".into(),
                "write -c -P 0x33 3M 64k".into(),
                "write -P 0x44 4095k 1k".into(),
            ],
        );
        let want = qemu_contents(&img);
        let ours = Image::open(&img, &keyed(PW).read_only(true)).unwrap();
        let mut got = vec![0u8; want.len()];
        ours.read_at(&mut got, 0).unwrap();
        assert_bytes_eq(&got, &want, &format!("{combo}: whole disk"));
        // Unaligned reads are widened to sectors and cut back.
        let mut part = vec![0u8; 5000];
        ours.read_at(&mut part, 100 * 1024 - 7).unwrap();
        assert_bytes_eq(&part, &want[100 * 1024 - 7..][..5000], combo);
    }
}

#[test]
fn library_writes_read_back_in_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (i, combo) in COMBOS.iter().enumerate() {
        let img = dir.path().join(format!("w{i}.qcow2"));
        qemu_create(&img, combo, "8M", &[]);
        qemu_io_keyed(&img, &["write -P 0x5a 0 192k".into()]);
        let size = 8usize << 20;
        let mut model = vec![0u8; size];
        model[..192 << 10].fill(0x5a);
        let mut rng = Rng::new(21 + i as u64);
        {
            let w = Image::open(&img, &keyed(PW)).unwrap();
            for _ in 0..40 {
                let len = 1 + rng.below(200_000) as usize;
                let off = rng.below((size - len) as u64) as usize;
                if rng.chance(15) {
                    w.write_zeroes(off as u64, len as u64, rng.chance(50))
                        .unwrap();
                    model[off..off + len].fill(0);
                } else {
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    w.write_at(&data, off as u64).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                }
            }
            // Vectored writes gather through the cipher too.
            let (a, b) = (vec![0x61u8; 700], vec![0x62u8; 1348]);
            w.write_vectored_at(
                &[std::io::IoSlice::new(&a), std::io::IoSlice::new(&b)],
                5 << 20,
            )
            .unwrap();
            model[5 << 20..(5 << 20) + 700].fill(0x61);
            model[(5 << 20) + 700..(5 << 20) + 2048].fill(0x62);
            w.close().unwrap();
        }
        assert_bytes_eq(
            &qemu_contents(&img),
            &model,
            &format!("{combo}: qemu's view"),
        );
        assert_qemu_check_clean(&img);
        qemu_io_keyed(&img, &[format!("read -P 0x62 {} 1348", (5 << 20) + 700)]);
    }
}

#[test]
fn copy_on_write_from_a_backing_file_is_encrypted() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    support::qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "2M"]);
    support::qemu_io(&base, &["write -P 0x77 0 2M".into()]);
    let top = dir.path().join("top.qcow2");
    qemu_create(
        &top,
        "",
        "2M",
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    {
        let w = Image::open(&top, &keyed(PW)).unwrap();
        w.write_at(&[0x88; 1000], 70_000).unwrap();
        w.close().unwrap();
    }
    let mut want = vec![0x77u8; 2 << 20];
    want[70_000..71_000].fill(0x88);
    assert_bytes_eq(&qemu_contents(&top), &want, "COW over the backing file");
    assert_qemu_check_clean(&top);
}

#[test]
fn wrong_or_missing_key_is_refused_and_writes_nothing() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("k.qcow2");
    qemu_create(&img, "", "1M", &[]);
    qemu_io_keyed(&img, &["write -P 0x5a 0 64k".into()]);
    let before = std::fs::read(&img).unwrap();
    let e = Image::open(&img, &keyed("wrong")).unwrap_err();
    assert_eq!(
        e.qemu_message(),
        "Invalid password, cannot unlock any keyslot"
    );
    let e = Image::open(&img, &OpenOptions::new()).unwrap_err();
    assert!(matches!(e.inner(), Error::EncryptionKeyRequired), "{e:?}");
    assert_eq!(
        e.qemu_message(),
        "Parameter 'encrypt.key-secret' is required for cipher"
    );
    let e = Image::open(&img, &OpenOptions::new().key_secret("nosuch")).unwrap_err();
    assert_eq!(e.qemu_message(), "No secret with id 'nosuch'");
    let e = Image::open(
        &img,
        &OpenOptions::from_qemu_str("encrypt.format=aes")
            .unwrap()
            .secrets(keyed(PW).get_secrets().clone())
            .key_secret("s"),
    )
    .unwrap_err();
    assert_eq!(
        e.qemu_message(),
        "Header reported 'luks' encryption format but options specify 'aes'"
    );
    assert_eq!(std::fs::read(&img).unwrap(), before, "nothing written");
    // The error names no secret.
    assert!(!format!("{e:?} {e}").contains(PW));
}

/// A flipped byte in slot 0's key material: the slot no longer opens, the
/// passphrase of slot 1 (added by `qemu-img amend`) still does.
#[test]
fn a_damaged_key_slot_fails_and_another_opens() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("slots.qcow2");
    qemu_create(&img, "", "1M", &[]);
    qemu_io_keyed(&img, &["write -P 0x5a 0 64k".into()]);
    let opts = image_opts(&img);
    let r = run_cmd(Command::new("qemu-img").args([
        "amend",
        "--object",
        &format!("secret,id=s,data={PW}"),
        "--object",
        "secret,id=s2,data=second",
        "-o",
        "encrypt.new-secret=s2,encrypt.state=active,encrypt.keyslot=1,encrypt.iter-time=10",
        "--image-opts",
        &opts,
    ]));
    assert_eq!(r.code, 0, "{r:?}");
    // Both open before the damage.
    for pw in [PW, "second"] {
        Image::open(&img, &keyed(pw).read_only(true)).unwrap();
    }
    let info = Image::open_for_info(&img, &OpenOptions::new()).unwrap();
    let (luks_at, _) = info.header().crypto_header().unwrap();
    let slot0 = info.luks_header().unwrap().slots[0].key_offset;
    assert!(info.luks_header().unwrap().slots[1].active);
    drop(info);
    let at = luks_at + slot0 + 1000;
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[at as usize] ^= 0x01;
    std::fs::write(&img, &bytes).unwrap();
    let e = Image::open(&img, &keyed(PW).read_only(true)).unwrap_err();
    assert_eq!(
        e.qemu_message(),
        "Invalid password, cannot unlock any keyslot"
    );
    // QEMU agrees.
    let r = qemu_keyed("qemu-io", &["-c", "read 0 512", "--image-opts", &opts]);
    assert!(
        r.err
            .contains("Invalid password, cannot unlock any keyslot"),
        "{r:?}"
    );
    let img2 = Image::open(&img, &keyed("second").read_only(true)).unwrap();
    let mut buf = vec![0u8; 65536];
    img2.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

/// A guest write that a corrupted L2 entry would send into the LUKS header
/// is refused by the overlap check (and the image marked corrupt), so the
/// key slots survive.
#[test]
fn the_luks_header_is_protected_by_the_overlap_check() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join(support::check::NAME);
    qemu_create(&img, "", "1M", &[]);
    qemu_io_keyed(&img, &["write -P 0x5a 0 64k".into()]);
    let info = Image::open_for_info(&img, &OpenOptions::new()).unwrap();
    let (luks_at, _) = info.header().crypto_header().unwrap();
    drop(info);
    // Point guest cluster 0 at the LUKS header's second cluster (COPIED).
    let twin = support::check::Img {
        dir: dir.path().to_path_buf(),
    };
    let pos = twin.l2_entry_pos(0);
    twin.set_u64(pos, (luks_at + 0x10000) | (1 << 63));
    let w = Image::open(&img, &keyed(PW)).unwrap();
    let e = w.write_at(&[1; 512], 0).unwrap_err();
    assert!(matches!(e, Error::OverlapPrevented { .. }), "{e:?}");
    drop(w);
    // The key material is intact: the image still unlocks.
    Image::open(&img, &keyed(PW).read_only(true)).unwrap();
}

/// The legacy `aes` format (`crypt_method` 1, IVs from guest offsets):
/// what QEMU wrote reads here, what we write reads in QEMU; like QEMU, a
/// wrong password opens and reads noise (the format has no key check).
#[test]
fn legacy_aes_images_read_and_write_like_qemu() {
    if !support::have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("aes.qcow2");
    let r = qemu_keyed(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s",
            img.to_str().unwrap(),
            "4M",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    qemu_io_keyed(
        &img,
        &[
            "write -P 0x5a 0 64k".into(),
            "write -P 0x21 70000 3000".into(),
            "write -c -P 0x33 1M 64k".into(),
        ],
    );
    let want = qemu_contents(&img);
    {
        let ours = Image::open(&img, &keyed(PW)).unwrap();
        let mut got = vec![0u8; want.len()];
        ours.read_at(&mut got, 0).unwrap();
        assert_bytes_eq(&got, &want, "aes: whole disk");
        ours.write_at(&[0x77; 4000], 2 << 20).unwrap();
        ours.write_at(&[0x78; 100], 100).unwrap();
        ours.close().unwrap();
    }
    let mut model = want;
    model[2 << 20..(2 << 20) + 4000].fill(0x77);
    model[100..200].fill(0x78);
    assert_bytes_eq(&qemu_contents(&img), &model, "aes: qemu's view");
    assert_qemu_check_clean(&img);
    let wrong = Image::open(&img, &keyed("wrong").read_only(true)).unwrap();
    let mut buf = vec![0u8; 512];
    wrong.read_at(&mut buf, 0).unwrap();
    assert_ne!(buf, vec![0x5au8; 512]);
}
