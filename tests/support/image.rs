//! QEMU as the reference for the library: `qemu-img`/`qemu-io` output,
//! check results, maps and reference images; a small deterministic RNG and
//! in-memory images.

use qcow2kit::image::BlockStatus;
use qcow2kit::storage::{MemStorage, Storage};
use qcow2kit::Extent;
use qcow2kit::{CreateOptions, Image, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use super::{run_cmd, Run};

fn describe(cmd: &str, r: &Run) -> String {
    format!(
        "{cmd} exited with {}\nstdout:\n{}\nstderr:\n{}",
        r.code, r.out, r.err
    )
}

/// Runs `qemu-img ARGS`, panicking on failure; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    qemu_img_in(Path::new("."), args)
}

/// The directory QEMU's tools run in for an image: QEMU resolves a relative
/// external data file name against the current directory (not the image's).
fn img_dir(img: &Path) -> &Path {
    match img.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Runs `qemu-img ARGS` in `dir`, panicking on failure; returns stdout.
pub fn qemu_img_in(dir: &Path, args: &[&str]) -> String {
    let out = run_cmd(Command::new("qemu-img").args(args).current_dir(dir));
    assert!(
        out.code == 0,
        "{}",
        describe(&format!("qemu-img {args:?}"), &out)
    );
    out.out
}

/// Runs `qemu-io -f qcow2 -c CMD... IMG`; panics if qemu-io fails or
/// reports a failed/mismatching command.
pub fn qemu_io(img: &Path, cmds: &[String]) -> String {
    qemu_io_fmt(img, "qcow2", cmds)
}

/// As [`qemu_io`] with an explicit format.
pub fn qemu_io_fmt(img: &Path, fmt: &str, cmds: &[String]) -> String {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg(fmt);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(img).current_dir(img_dir(img));
    let out = run_cmd(&mut c);
    let text = format!("{}{}", out.out, out.err);
    assert!(
        out.code == 0 && !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "{}",
        describe(&format!("qemu-io {cmds:?} {}", img.display()), &out)
    );
    text
}

/// The result of `qemu-img check --output=json`.
#[derive(Debug, Clone)]
pub struct Check {
    pub exit: i32,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub json: serde_json::Value,
    pub stderr: String,
}

impl Check {
    pub fn is_clean(&self) -> bool {
        self.exit == 0 && self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

/// Runs `qemu-img check --output=json` (never repairs).
pub fn qemu_check(img: &Path) -> Check {
    let out = run_cmd(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2", "--output=json"])
            .arg(img)
            .current_dir(img_dir(img)),
    );
    let json: serde_json::Value = serde_json::from_str(&out.out).unwrap_or(serde_json::Value::Null);
    let n = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    Check {
        exit: out.code,
        corruptions: n("corruptions"),
        leaks: n("leaks"),
        check_errors: n("check-errors"),
        stderr: out.err,
        json,
    }
}

/// Asserts that `qemu-img check` finds neither corruption nor leaks.
pub fn assert_check_clean(img: &Path, what: &str) {
    let c = qemu_check(img);
    assert!(
        c.is_clean(),
        "qemu-img check of {what} ({}) is not clean: {c:?}\nhuman output:\n{}",
        img.display(),
        human_check(img)
    );
}

/// Asserts that `qemu-img check` finds no corruption (leaks are allowed).
pub fn assert_no_corruption(img: &Path, what: &str) {
    let c = qemu_check(img);
    assert!(
        c.corruptions == 0 && c.check_errors == 0 && (c.exit == 0 || c.exit == 3),
        "qemu-img check of {what} ({}) finds corruption: {c:?}\nhuman output:\n{}",
        img.display(),
        human_check(img)
    );
}

pub fn human_check(img: &Path) -> String {
    let out = run_cmd(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(img)
            .current_dir(img_dir(img)),
    );
    format!("{}{}", out.out, out.err)
}

/// The guest content of `img` as QEMU sees it (`qemu-img convert -O raw`).
pub fn qemu_raw(img: &Path) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("out.raw");
    qemu_img_in(
        img_dir(img),
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(&raw).unwrap()
}

/// The directory of reference images made by `testdata/make-images.sh`, made
/// once per test binary (under cargo's target tmpdir, replaced each run).
pub fn reference_images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let stem = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("images-{stem}"));
        let _ = std::fs::remove_dir_all(&dir);
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/make-images.sh");
        let out = run_cmd(Command::new("bash").arg(&script).arg(&dir));
        assert!(out.code == 0, "{}", describe("make-images.sh", &out));
        dir
    })
}

/// What a guest range maps to in one image (not looking into backing files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unallocated,
    Zero(Option<u64>),
    Data(u64),
    Compressed,
}

/// A run of guest bytes of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRun {
    pub start: u64,
    pub len: u64,
    pub kind: Kind,
}

/// Appends a run, merging it into the previous one where QEMU's map would
/// (same kind, contiguous host offsets).
pub fn push_run(v: &mut Vec<MapRun>, r: MapRun) {
    if r.len == 0 {
        return;
    }
    if let Some(last) = v.last_mut() {
        let merge = match (last.kind, r.kind) {
            (Kind::Unallocated, Kind::Unallocated) => true,
            (Kind::Compressed, Kind::Compressed) => true,
            (Kind::Zero(None), Kind::Zero(None)) => true,
            (Kind::Zero(Some(a)), Kind::Zero(Some(b))) | (Kind::Data(a), Kind::Data(b)) => {
                a + last.len == b
            }
            _ => false,
        };
        if merge && last.start + last.len == r.start {
            last.len += r.len;
            return;
        }
    }
    v.push(r);
}

/// `qemu-img map --output=json` reduced to what this image itself says.
pub fn qemu_map(img: &Path) -> Vec<MapRun> {
    let out = qemu_img_in(
        img_dir(img),
        &["map", "--output=json", img.to_str().unwrap()],
    );
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut v = Vec::new();
    for e in json.as_array().unwrap() {
        let g = |k: &str| e.get(k).and_then(|x| x.as_u64());
        let b = |k: &str| e.get(k).and_then(|x| x.as_bool()).unwrap_or(false);
        let start = g("start").unwrap();
        let len = g("length").unwrap();
        let kind = if g("depth") != Some(0) || !b("present") {
            Kind::Unallocated
        } else if b("compressed") {
            Kind::Compressed
        } else if b("data") {
            Kind::Data(g("offset").unwrap())
        } else {
            Kind::Zero(g("offset"))
        };
        push_run(&mut v, MapRun { start, len, kind });
    }
    v
}

/// The same map built from `Image::block_status`.
pub fn our_map(img: &Image) -> Vec<MapRun> {
    let size = img.size();
    let mut v = Vec::new();
    let mut off = 0;
    while off < size {
        let BlockStatus { len, extent } = img.block_status(off, size - off).unwrap();
        assert!(len > 0 && len <= size - off, "block_status({off}) = {len}");
        let kind = match extent {
            Extent::Unallocated => Kind::Unallocated,
            Extent::Zero { host } => Kind::Zero(host),
            Extent::Data { host } => Kind::Data(host),
            Extent::Compressed { .. } => Kind::Compressed,
        };
        push_run(
            &mut v,
            MapRun {
                start: off,
                len,
                kind,
            },
        );
        off += len;
    }
    v
}

/// A small deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Creates an image in memory with `create_on`.
pub fn mem_create(opts: &CreateOptions, size: u64) -> Arc<MemStorage> {
    let mem = Arc::new(MemStorage::new());
    qcow2kit::create::create_on(mem.clone(), opts, size).unwrap();
    mem
}

/// Opens an image held in memory.
pub fn mem_open(mem: &Arc<MemStorage>, opts: &OpenOptions) -> qcow2kit::Result<Image> {
    Image::open_storage(mem.clone() as Arc<dyn Storage>, opts)
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Index of the first differing byte, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Asserts two byte slices are equal, reporting the first difference.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = first_diff(got, want) {
        panic!(
            "{what}: differs at byte {i} (len {} vs {}): got {:02x?} want {:02x?}",
            got.len(),
            want.len(),
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}
