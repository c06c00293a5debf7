//! Twins for the check tests: images made with qemu-img/qemu-io in a
//! temporary directory, damaged by code, and checked side by side with
//! `qemu-img check` on a twin copy.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{json, run_cmd as run, Run, QCOW2_CHECK};

/// An image file and its directory (the file is always `img.qcow2` there, so
/// reports of twins carry the same file name).
pub struct Img {
    pub dir: PathBuf,
}

pub const NAME: &str = "img.qcow2";

impl Img {
    pub fn path(&self) -> PathBuf {
        self.dir.join(NAME)
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.path()).unwrap()
    }

    pub fn len(&self) -> u64 {
        std::fs::metadata(self.path()).unwrap().len()
    }

    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(self.path()).unwrap();
        let mut b = vec![0u8; len];
        let n = f.read_at(&mut b, off).unwrap_or(0);
        b.truncate(n);
        b.resize(len, 0);
        b
    }

    pub fn write(&self, off: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path())
            .unwrap();
        f.write_all_at(data, off).unwrap();
    }

    pub fn u64_at(&self, off: u64) -> u64 {
        u64::from_be_bytes(self.read(off, 8).try_into().unwrap())
    }

    pub fn u32_at(&self, off: u64) -> u32 {
        u32::from_be_bytes(self.read(off, 4).try_into().unwrap())
    }

    pub fn set_u64(&self, off: u64, v: u64) {
        self.write(off, &v.to_be_bytes());
    }

    pub fn set_u32(&self, off: u64, v: u32) {
        self.write(off, &v.to_be_bytes());
    }

    pub fn truncate(&self, len: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path())
            .unwrap();
        f.set_len(len).unwrap();
    }

    pub fn cluster_bits(&self) -> u32 {
        self.u32_at(20)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits()
    }

    pub fn version(&self) -> u32 {
        self.u32_at(4)
    }

    pub fn refcount_order(&self) -> u32 {
        if self.version() >= 3 {
            self.u32_at(96)
        } else {
            4
        }
    }

    pub fn extended_l2(&self) -> bool {
        self.version() >= 3 && self.u64_at(72) & (1 << 4) != 0
    }

    pub fn l1_offset(&self) -> u64 {
        self.u64_at(40)
    }

    pub fn l1_size(&self) -> u32 {
        self.u32_at(36)
    }

    pub fn reftable_offset(&self) -> u64 {
        self.u64_at(48)
    }

    pub fn snapshots_offset(&self) -> u64 {
        self.u64_at(64)
    }

    pub fn l1_entry(&self, i: u64) -> u64 {
        self.u64_at(self.l1_offset() + i * 8)
    }

    pub fn set_l1_entry(&self, i: u64, v: u64) {
        self.set_u64(self.l1_offset() + i * 8, v);
    }

    fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Host offset of the L2 entry of guest cluster `g`.
    pub fn l2_entry_pos(&self, g: u64) -> u64 {
        let per = self.cluster_size() / self.l2_entry_bytes();
        let l2 = self.l1_entry(g / per) & 0x00ff_ffff_ffff_fe00;
        assert_ne!(l2, 0, "guest cluster {g} has no L2 table");
        l2 + (g % per) * self.l2_entry_bytes()
    }

    pub fn l2_entry(&self, g: u64) -> u64 {
        self.u64_at(self.l2_entry_pos(g))
    }

    pub fn set_l2_entry(&self, g: u64, v: u64) {
        self.set_u64(self.l2_entry_pos(g), v);
    }

    /// Host offset of guest cluster `g`'s data.
    pub fn host_of(&self, g: u64) -> u64 {
        self.l2_entry(g) & 0x00ff_ffff_ffff_fe00
    }

    /// (byte offset, shift, width) of the refcount cell of host cluster `c`.
    fn refcount_cell(&self, c: u64) -> (u64, u32, u32) {
        let order = self.refcount_order();
        let bits = 1u32 << order;
        let per_block = self.cluster_size() * 8 / u64::from(bits);
        let rt = self.u64_at(self.reftable_offset() + (c / per_block) * 8) & !0x1ff;
        assert_ne!(rt, 0, "no refcount block for cluster {c}");
        let i = c % per_block;
        if bits < 8 {
            let per_byte = 8 / u64::from(bits);
            (rt + i / per_byte, (i % per_byte) as u32 * bits, bits)
        } else {
            (rt + i * u64::from(bits / 8), 0, bits)
        }
    }

    pub fn refcount(&self, c: u64) -> u64 {
        let (off, shift, bits) = self.refcount_cell(c);
        if bits < 8 {
            u64::from((self.read(off, 1)[0] >> shift) & ((1u8 << bits) - 1))
        } else {
            let b = self.read(off, (bits / 8) as usize);
            b.iter().fold(0u64, |a, x| (a << 8) | u64::from(*x))
        }
    }

    pub fn set_refcount(&self, c: u64, v: u64) {
        let (off, shift, bits) = self.refcount_cell(c);
        if bits < 8 {
            let mask = ((1u8 << bits) - 1) << shift;
            let old = self.read(off, 1)[0];
            self.write(off, &[(old & !mask) | (((v as u8) << shift) & mask)]);
        } else {
            let n = (bits / 8) as usize;
            let b = v.to_be_bytes();
            self.write(off, &b[8 - n..]);
        }
    }

    pub fn set_incompatible(&self, bits: u64) {
        let v = self.u64_at(72);
        self.set_u64(72, v | bits);
    }

    pub fn incompatible(&self) -> u64 {
        self.u64_at(72)
    }

    /// Runs qemu-io commands on the image.
    pub fn io(&self, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.current_dir(&self.dir);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        c.arg(NAME);
        let r = run(&mut c);
        assert_eq!(r.code, 0, "qemu-io {cmds:?}: {}", r.err);
    }

    /// Runs qemu-io commands that end in a crash (`abort`).
    pub fn io_crash(&self, cmds: &[&str]) {
        let mut c = Command::new("qemu-io");
        c.current_dir(&self.dir);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        c.arg(NAME);
        let r = run(&mut c);
        assert_ne!(r.code, 0, "qemu-io {cmds:?} was meant to crash");
    }

    /// Runs `qemu-img ARGS` in the image's directory.
    pub fn qemu_img(&self, args: &[&str]) -> Run {
        run(Command::new("qemu-img").current_dir(&self.dir).args(args))
    }

    /// `qemu-img check ARGS img.qcow2`.
    pub fn qemu_check(&self, args: &[&str]) -> Run {
        run(Command::new("qemu-img")
            .current_dir(&self.dir)
            .arg("check")
            .args(args)
            .arg(NAME))
    }

    /// `qcow2-check ARGS img.qcow2`.
    pub fn our_check(&self, args: &[&str]) -> Run {
        run(Command::new(QCOW2_CHECK)
            .current_dir(&self.dir)
            .args(args)
            .arg(NAME))
    }

    /// The guest data (`qemu-img convert -O raw`).
    pub fn raw(&self) -> Vec<u8> {
        self.try_raw().expect("qemu-img convert failed")
    }

    /// The guest data, or `None` if qemu-img cannot read the image.
    pub fn try_raw(&self) -> Option<Vec<u8>> {
        let out = self.dir.join("raw.out");
        let r = self.qemu_img(&["convert", "-U", "-O", "raw", NAME, "raw.out"]);
        if r.code != 0 {
            let _ = std::fs::remove_file(&out);
            return None;
        }
        let data = std::fs::read(&out).unwrap();
        std::fs::remove_file(out).unwrap();
        Some(data)
    }
}

/// A damaged image and its twin: `q` is handed to qemu-img, `o` to us.
pub struct Twin {
    _tmp: tempfile::TempDir,
    pub q: Img,
    pub o: Img,
}

impl Twin {
    /// Creates `img.qcow2` with `qemu-img create -f qcow2 OPTS img.qcow2 SIZE`.
    pub fn create(opts: &[&str], size: &str) -> Twin {
        let tmp = tempfile::tempdir().unwrap();
        let q = Img {
            dir: tmp.path().join("q"),
        };
        let o = Img {
            dir: tmp.path().join("o"),
        };
        std::fs::create_dir_all(&q.dir).unwrap();
        std::fs::create_dir_all(&o.dir).unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.push(NAME);
        args.push(size);
        let r = q.qemu_img(&args);
        assert_eq!(r.code, 0, "create: {}", r.err);
        Twin { _tmp: tmp, q, o }
    }

    /// The image to set up and damage (before [`Twin::split`]).
    pub fn img(&self) -> &Img {
        &self.q
    }

    /// Copies the (damaged) image to the twin.
    pub fn split(&self) {
        std::fs::copy(self.q.path(), self.o.path()).unwrap();
    }
}

/// The three counters and the exit code of a JSON check.
pub fn counts(v: &Value) -> (u64, u64, u64) {
    let g = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    (g("corruptions"), g("leaks"), g("check-errors"))
}

/// How strictly to compare the plain check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strict {
    /// JSON, exit code, human stdout and the stderr lines.
    All,
    /// JSON and exit code only.
    Counts,
}

/// qemu-img's stderr with our program name. QEMU's hint after the stale
/// bitmaps warning lacks its newline; ours has it.
pub fn qemu_stderr_as_ours(s: &str) -> String {
    s.replace("qemu-img check", "qcow2-check")
        .replace("qemu-img:", "qcow2-check:")
        .replace("on the image file to fix.", "on the image file to fix.\n")
}

/// Checks both twins without repair and compares the results with qemu-img's.
/// Also checks that our plain check did not change the file.
pub fn assert_check_same(t: &Twin, strict: Strict) -> Value {
    t.split();
    let before = t.o.bytes();
    let q = t.q.qemu_check(&["--output", "json"]);
    let o = t.o.our_check(&["--output", "json"]);
    assert_eq!(
        o.code, q.code,
        "exit codes differ\nqemu: {q:#?}\nours: {o:#?}"
    );
    let (qj, oj) = if q.out.trim().is_empty() {
        (Value::Null, Value::Null)
    } else {
        (json(&q.out), json(&o.out))
    };
    assert_eq!(oj, qj, "JSON differs\nqemu: {q:#?}\nours: {o:#?}");
    if strict == Strict::All {
        assert_eq!(o.err, qemu_stderr_as_ours(&q.err), "stderr differs");
        let qh = t.q.qemu_check(&[]);
        let oh = t.o.our_check(&[]);
        assert_eq!(oh.out, qh.out, "human output differs");
        assert_eq!(oh.code, qh.code);
    }
    assert!(
        t.o.bytes() == before,
        "a check without -r changed the image"
    );
    qj
}

/// Repairs `q` with qemu-img and `o` with us (`mode` = leaks|all), then
/// re-checks both with qemu-img: same exit codes, same remaining counters,
/// and the same guest data. Returns qemu-img's re-check JSON.
pub fn assert_repair_same(t: &Twin, mode: &str) -> Value {
    t.split();
    let q = t.q.qemu_check(&["-r", mode, "--output", "json"]);
    let o = t.o.our_check(&["-r", mode, "--output", "json"]);
    assert_eq!(
        o.code, q.code,
        "repair exit codes differ\nqemu: {q:#?}\nours: {o:#?}"
    );
    if !q.out.trim().is_empty() {
        let (qj, oj) = (json(&q.out), json(&o.out));
        assert_eq!(oj, qj, "repair JSON differs\nqemu: {q:#?}\nours: {o:#?}");
        assert_eq!(o.err, qemu_stderr_as_ours(&q.err), "repair stderr differs");
    }
    let qr = t.q.qemu_check(&["--output", "json"]);
    let or = t.o.qemu_check(&["--output", "json"]);
    assert_eq!(
        or.code, qr.code,
        "re-check exit codes differ\nqemu: {qr:#?}\nours: {or:#?}"
    );
    if !qr.out.trim().is_empty() {
        let (qj, oj) = (json(&qr.out), json(&or.out));
        assert_eq!(
            counts(&oj),
            counts(&qj),
            "re-check counters differ\nqemu: {qr:#?}\nours: {or:#?}"
        );
        for k in [
            "allocated-clusters",
            "total-clusters",
            "compressed-clusters",
        ] {
            assert_eq!(oj.get(k), qj.get(k), "re-check {k} differs");
        }
    }
    // Guest data: qemu-img's repaired twin is the reference wherever it
    // can be read at all.
    if let Some(reference) = t.q.try_raw() {
        assert!(
            t.o.try_raw().as_ref() == Some(&reference),
            "guest data differs after repair"
        );
    }
    // Our own re-check agrees with qemu-img's.
    let mine = t.o.our_check(&["--output", "json"]);
    assert_eq!(mine.code, or.code, "our re-check: {mine:#?}\nqemu: {or:#?}");
    qr_json(&qr)
}

fn qr_json(r: &Run) -> Value {
    if r.out.trim().is_empty() {
        Value::Null
    } else {
        json(&r.out)
    }
}

/// Path helper for tests that need their own files.
pub fn sibling(img: &Img, name: &str) -> PathBuf {
    img.dir.join(name)
}

/// Whether a path exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}
