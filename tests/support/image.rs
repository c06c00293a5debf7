//! QEMU as the reference for the library: `qemu-img`/`qemu-io` output,
//! check results, maps and reference images; a small deterministic RNG and
//! in-memory images.

use qcow2kit::crypto::{Secret, SecretStore};
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

/// The secret of the encrypted variants of the interop suites
/// (`--object secret,id=s,data=...`).
pub const LUKS_SECRET: &str = "secret,id=s,data=luks21-passphrase";
/// The passphrase in [`LUKS_SECRET`].
pub const LUKS_PASSPHRASE: &str = "luks21-passphrase";
/// The `-o` options that make a LUKS image keyed with [`LUKS_SECRET`]
/// (QEMU's default cipher; short key derivation, so opens stay fast).
pub const LUKS_CREATE: &str = "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10";

/// How the tools and the library open an image of a test: plain, or with
/// the LUKS key [`LUKS_SECRET`] for the image itself (`top`) and/or its
/// first backing file (`backing`, QEMU's `backing.encrypt.key-secret`).
/// QEMU's tools then take `--object SECRET --image-opts
/// driver=qcow2,encrypt.key-secret=s,file.filename=IMG` instead of
/// `-f qcow2 IMG`; the library gets [`Key::open_options`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The image is encrypted.
    pub top: bool,
    /// Its first backing file is encrypted.
    pub backing: bool,
}

impl Key {
    /// No encryption anywhere.
    pub const PLAIN: Key = Key {
        top: false,
        backing: false,
    };
    /// The image is LUKS-encrypted, its backing file (if any) is not.
    pub const LUKS: Key = Key {
        top: true,
        backing: false,
    };
    /// The image and its backing file are both LUKS-encrypted.
    pub const LUKS_CHAIN: Key = Key {
        top: true,
        backing: true,
    };
    /// A plain image over a LUKS-encrypted backing file.
    pub const LUKS_BACKING: Key = Key {
        top: false,
        backing: true,
    };

    /// Whether any key is involved.
    pub fn keyed(self) -> bool {
        self.top || self.backing
    }

    /// The arguments naming `img` to a QEMU tool, after its options (and,
    /// for qemu-img, after the subcommand).
    pub fn qemu_args(self, img: &Path) -> Vec<String> {
        if !self.keyed() {
            return vec!["-f".into(), "qcow2".into(), img.to_str().unwrap().into()];
        }
        let mut opts = format!("driver=qcow2,file.filename={}", img.display());
        if self.top {
            opts.push_str(",encrypt.key-secret=s");
        }
        if self.backing {
            opts.push_str(",backing.encrypt.key-secret=s");
        }
        vec![
            "--object".into(),
            LUKS_SECRET.into(),
            "--image-opts".into(),
            opts,
        ]
    }

    /// `qemu-img create` arguments making a new image encrypted (before
    /// the file name; empty when the image itself is plain).
    pub fn create_args(self) -> Vec<String> {
        if !self.top {
            return Vec::new();
        }
        vec![
            "--object".into(),
            LUKS_SECRET.into(),
            "-o".into(),
            LUKS_CREATE.into(),
        ]
    }

    /// The secrets of this key (empty when plain).
    pub fn secrets(self) -> SecretStore {
        let mut s = SecretStore::new();
        if self.keyed() {
            s.insert("s", Secret::new(LUKS_PASSPHRASE));
        }
        s
    }

    /// Library open options with this key.
    pub fn open_options(self) -> OpenOptions {
        let mut o = OpenOptions::new();
        if self.keyed() {
            o = o.secrets(self.secrets());
        }
        if self.top {
            o = o.key_secret("s");
        }
        if self.backing {
            o = o.backing_key_secret("s");
        }
        o
    }

    /// `opts` making an encrypted image when the image itself is keyed.
    pub fn create_options(self, opts: CreateOptions) -> CreateOptions {
        if !self.top {
            return opts;
        }
        let mut opts = opts.secrets(self.secrets());
        opts.apply_qemu_str(LUKS_CREATE).unwrap();
        opts
    }
}

/// [`qemu_io`] through `key`.
pub fn qemu_io_key(img: &Path, key: Key, cmds: &[String]) -> String {
    if !key.keyed() {
        return qemu_io(img, cmds);
    }
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.args(key.qemu_args(img)).current_dir(img_dir(img));
    let out = run_cmd(&mut c);
    let text = format!("{}{}", out.out, out.err);
    assert!(
        out.code == 0 && !text.contains("Pattern verification failed") && !text.contains("failed:"),
        "{}",
        describe(&format!("qemu-io {cmds:?} {}", img.display()), &out)
    );
    text
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
    qemu_check_key(img, Key::PLAIN)
}

/// [`qemu_check`] through `key`.
pub fn qemu_check_key(img: &Path, key: Key) -> Check {
    let out = run_cmd(
        Command::new("qemu-img")
            .args(["check", "--output=json"])
            .args(key.qemu_args(img))
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
    assert_check_clean_key(img, Key::PLAIN, what);
}

/// [`assert_check_clean`] through `key`.
pub fn assert_check_clean_key(img: &Path, key: Key, what: &str) {
    let c = qemu_check_key(img, key);
    assert!(
        c.is_clean(),
        "qemu-img check of {what} ({}) is not clean: {c:?}\nhuman output:\n{}",
        img.display(),
        human_check_key(img, key)
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
    human_check_key(img, Key::PLAIN)
}

/// `qemu-img check`'s human output through `key`.
pub fn human_check_key(img: &Path, key: Key) -> String {
    let out = run_cmd(
        Command::new("qemu-img")
            .arg("check")
            .args(key.qemu_args(img))
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

/// [`qemu_raw`] through `key`.
pub fn qemu_raw_key(img: &Path, key: Key) -> Vec<u8> {
    if !key.keyed() {
        return qemu_raw(img);
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("out.raw");
    let mut args = vec!["convert".to_owned(), "-O".into(), "raw".into()];
    args.extend(key.qemu_args(img));
    args.push(raw.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img_in(img_dir(img), &args);
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
                a.checked_add(last.len) == Some(b)
            }
            _ => false,
        };
        let merge = merge
            || matches!(
                (last.kind, r.kind),
                (Kind::Data(HIDDEN), Kind::Data(HIDDEN))
            );
        if merge && last.start + last.len == r.start {
            last.len += r.len;
            return;
        }
    }
    v.push(r);
}

/// The host offset of a data run whose offset is not shown: QEMU's map
/// hides host offsets of encrypted images (`qcow2_co_block_status` sets no
/// `BDRV_BLOCK_OFFSET_VALID` with a crypto context).
pub const HIDDEN: u64 = u64::MAX;

/// `runs` as QEMU shows an encrypted image's: data without host offsets,
/// zero runs without their preallocated clusters (merged again).
pub fn hide_host_offsets(runs: &[MapRun]) -> Vec<MapRun> {
    let mut v = Vec::new();
    for r in runs {
        let kind = match r.kind {
            Kind::Data(_) => Kind::Data(HIDDEN),
            Kind::Zero(_) => Kind::Zero(None),
            k => k,
        };
        push_run(&mut v, MapRun { kind, ..*r });
    }
    v
}

/// `qemu-img map --output=json` reduced to what this image itself says.
pub fn qemu_map(img: &Path) -> Vec<MapRun> {
    qemu_map_key(img, Key::PLAIN)
}

/// [`qemu_map`] through `key` (the raw JSON is [`qemu_map_json`]).
pub fn qemu_map_key(img: &Path, key: Key) -> Vec<MapRun> {
    let out = qemu_map_json(img, key);
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
            Kind::Data(g("offset").unwrap_or(HIDDEN))
        } else {
            Kind::Zero(g("offset"))
        };
        push_run(&mut v, MapRun { start, len, kind });
    }
    v
}

/// `qemu-img map --output=json` of `img` through `key`, as printed.
pub fn qemu_map_json(img: &Path, key: Key) -> String {
    let mut args = vec!["map".to_owned(), "--output=json".into()];
    if key.keyed() {
        args.extend(key.qemu_args(img));
    } else {
        // Probed, as the plain suites always did.
        args.push(img.to_str().unwrap().into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img_in(img_dir(img), &args)
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

/// Makes `dst` a LUKS-encrypted copy of the image `src` (keyed with
/// [`LUKS_SECRET`], the same cluster size and L2 entry width; backing
/// data is copied in), then gives it every kind of cluster with qemu-io
/// through the key: a partial write, zero clusters with and without
/// their host clusters, a discard and a compressed cluster (qemu-img
/// convert refuses `-c` into an encrypted image, qemu-io's `write -c`
/// does it). `src` is opened by QEMU with `src_key`.
pub fn luks_copy(src: &Path, src_key: Key, dst: &Path) {
    let mut args = vec!["info".to_owned(), "--output=json".into()];
    args.extend(src_key.qemu_args(src));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let info: serde_json::Value = serde_json::from_str(&qemu_img_in(img_dir(src), &args)).unwrap();
    let cs = info["cluster-size"].as_u64().unwrap();
    let size = info["virtual-size"].as_u64().unwrap();
    let ext = info["format-specific"]["data"]["extended-l2"]
        .as_bool()
        .unwrap_or(false);
    let o = format!(
        "{LUKS_CREATE},cluster_size={cs}{}",
        if ext { ",extended_l2=on" } else { "" }
    );
    let mut args = vec![
        "convert".to_owned(),
        "--object".into(),
        LUKS_SECRET.into(),
        "-O".into(),
        "qcow2".into(),
        "-o".into(),
        o,
    ];
    if src_key.keyed() {
        args.extend(src_key.qemu_args(src).into_iter().skip(2));
    } else {
        args.push(src.to_str().unwrap().into());
    }
    args.push(dst.to_str().unwrap().into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qemu_img_in(img_dir(src), &args);
    let at = |x: u64| x / cs * cs;
    // `len` bytes from `off`, cut at the end of the disk.
    let run = |off: u64, len: u64| format!("{off} {}", len.min(size - off));
    let c = at(size - 2 * cs);
    let cmds = vec![
        format!("write -P 0x3c {} 3000", cs / 2 + 5),
        format!("write -z {}", run(at(size / 2), 2 * cs)),
        format!("write -z -u {}", run(at(size / 4), cs)),
        format!("discard {}", run(at(size * 3 / 4), 2 * cs)),
        format!("discard {c} {cs}"),
        format!("write -c -P 0x5c {c} {cs}"),
        format!("write -P 0x3d {} 200", size - 300),
    ];
    qemu_io_key(dst, Key::LUKS, &cmds);
}
