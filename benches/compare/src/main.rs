//! Peer comparison harness for qcow2kit (issue 14, item 6). Run it through
//! `benches/compare/run.sh [--quick]`; see README.md next to this crate.
//!
//! `qcow2kit-compare run [--quick] [--only NAME,...] [--fs DIR,...] [--out FILE]`
//! creates the images, runs every cell in its own process (this binary's
//! `cell` subcommand, or `qemu-img bench`), verifies what the writing cells
//! left behind with `qemu-img check` and `qemu-io read -P`, and prints the
//! tables (and writes them to `--out`).

mod cell;
mod null;
mod work;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use work::{Kind, Pattern, Workload, DISK, WORKLOADS};

/// Engines in table order. `qemu-d1`/`qemu-d32` are `qemu-img bench`.
const ENGINES: &[&str] = &[
    "raw", "qemu-d1", "qemu-d32", "imago", "qcow2-rs", "qcow2kit", "null",
];
/// Engines that can share one image between threads.
const MT_ENGINES: &[&str] = &["raw", "imago", "qcow2kit", "null"];
/// Workloads of the threads table.
const MT_WORKLOADS: &[&str] = &["rand-read", "rand-overwrite", "rand-alloc"];

/// Write pattern byte per engine, so a read-back proves whose data it is.
fn pattern(engine: &str) -> u8 {
    match engine {
        "raw" => 0x11,
        "qemu-d1" => 0x21,
        "qemu-d32" => 0x22,
        "imago" => 0x31,
        "qcow2-rs" => 0x41,
        "qcow2kit" => 0x51,
        _ => 0x61,
    }
}

#[derive(Clone, Debug, Default)]
struct Cell {
    ops: u64,
    secs: f64,
    hwm_kib: u64,
    /// Verification result of a writing cell ("" when not applicable).
    verify: String,
    error: Option<String>,
}

impl Cell {
    fn iops(&self) -> Option<f64> {
        (self.error.is_none() && self.secs > 0.0).then(|| self.ops as f64 / self.secs)
    }
}

struct Config {
    quick: bool,
    secs: f64,
    warm: f64,
    alloc_frac: f64,
    only: Option<Vec<String>>,
    fs: Vec<PathBuf>,
    out: Option<PathBuf>,
    aio: String,
    reps: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.first().map(String::as_str) {
        Some("cell") => run_cell(&args[1..]),
        Some("run") => run_all(&args[1..]),
        _ => Err(
            "usage: qcow2kit-compare run [--quick] [--only W,..] [--fs DIR,..] [--out FILE]".into(),
        ),
    };
    if let Err(e) = r {
        eprintln!("qcow2kit-compare: {e}");
        std::process::exit(1);
    }
}

fn run_cell(a: &[String]) -> Result<(), String> {
    if a.len() != 9 {
        return Err(format!("cell: expected 9 arguments, got {}", a.len()));
    }
    let p = |i: usize| {
        a[i].parse::<f64>()
            .map_err(|e| format!("argument {i}: {e}"))
    };
    let args = cell::CellArgs {
        engine: a[0].clone(),
        workload: work::workload(&a[1]).ok_or("unknown workload")?,
        threads: a[2].parse().map_err(|e| format!("threads: {e}"))?,
        image: a[3].clone().into(),
        scratch: a[4].clone().into(),
        secs: p(5)?,
        warm: p(6)?,
        alloc_frac: p(7)?,
        pattern: a[8].parse().map_err(|e| format!("pattern: {e}"))?,
    };
    cell::run(&args).map_err(|e| e.to_string())
}

fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn qemu_img(args: &[&str]) -> Result<String, String> {
    sh(Command::new("qemu-img").args(args))
}

/// The images of one file system.
struct Images {
    dir: PathBuf,
    full_q: PathBuf,
    full_r: PathBuf,
    ow_q: PathBuf,
    ow_r: PathBuf,
    empty_q: PathBuf,
    /// On tmpfs: nothing can be evicted, and unlinking is cheap.
    tmpfs: bool,
}

/// Reads a file through so the cell starts with it in the page cache (the
/// disk runs share the machine's memory with other jobs, which evicts it).
fn warm_cache(path: &Path) {
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open(path) {
        let mut buf = vec![0u8; 1 << 20];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn make_images(root: &Path) -> Result<Images, String> {
    let dir = root.join(format!("qcow2kit-compare.{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let im = Images {
        full_q: dir.join("full.qcow2"),
        full_r: dir.join("full.raw"),
        ow_q: dir.join("ow.qcow2"),
        ow_r: dir.join("ow.raw"),
        empty_q: dir.join("empty.qcow2"),
        tmpfs: cell::on_tmpfs(&dir.join("x")),
        dir,
    };
    let size = DISK.to_string();
    // Every cluster written with 0x5a, 64 MiB per request.
    let writes: Vec<String> = (0..DISK / (64 << 20))
        .map(|i| format!("write -P 0x5a {} 64M", i * (64 << 20)))
        .collect();
    for (fmt, path) in [("qcow2", &im.full_q), ("raw", &im.full_r)] {
        let p = path.to_str().ok_or("path")?;
        if fmt == "qcow2" {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=64k",
                p,
                &size,
            ])?;
        } else {
            qemu_img(&["create", "-q", "-f", "raw", p, &size])?;
        }
        let mut c = Command::new("qemu-io");
        c.args(["-f", fmt]);
        for w in &writes {
            c.args(["-c", w]);
        }
        sh(c.arg(p))?;
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=64k",
        im.empty_q.to_str().ok_or("path")?,
        &size,
    ])?;
    for (a, b) in [(&im.full_q, &im.ow_q), (&im.full_r, &im.ow_r)] {
        std::fs::copy(a, b).map_err(|e| format!("copy: {e}"))?;
    }
    sh(&mut Command::new("sync"))?;
    Ok(im)
}

/// `qemu-img check` plus `qemu-io read -P` of the samples.
fn verify(fmt: &str, image: &Path, samples: &[(u64, usize)], pat: u8) -> String {
    let img = image.to_string_lossy();
    let mut status = String::from("ok");
    if fmt == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", &img])
            .output();
        match out {
            Ok(o) if o.status.code() == Some(0) => {}
            Ok(o) if o.status.code() == Some(3) => status = "ok (check: leaked clusters)".into(),
            Ok(o) => {
                return format!(
                    "FAIL: qemu-img check exit {:?}: {}",
                    o.status.code(),
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" / ")
                )
            }
            Err(e) => return format!("FAIL: qemu-img check: {e}"),
        }
    }
    if samples.is_empty() {
        return status;
    }
    let mut c = Command::new("qemu-io");
    c.args(["-r", "-f", fmt]);
    for (o, l) in samples {
        c.args(["-c", &format!("read -P {pat:#x} {o} {l}")]);
    }
    match c.arg(&*img).output() {
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            if !o.status.success() || text.contains("failed") || text.contains("error") {
                return format!(
                    "FAIL: read-back: {}",
                    text.lines()
                        .find(|l| l.contains("fail") || l.contains("error"))
                        .unwrap_or("")
                );
            }
            let reads = text.matches("read ").count();
            if reads < samples.len() {
                return format!(
                    "FAIL: read-back: only {reads}/{} reads completed",
                    samples.len()
                );
            }
            format!("{status}, {} samples read back", samples.len())
        }
        Err(e) => format!("FAIL: qemu-io: {e}"),
    }
}

fn cell_process(
    cfg: &Config,
    engine: &str,
    w: &Workload,
    threads: usize,
    image: &Path,
    scratch: &Path,
) -> Cell {
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new(exe)
        .args([
            "cell",
            engine,
            w.name,
            &threads.to_string(),
            &image.to_string_lossy(),
            &scratch.to_string_lossy(),
            &cfg.secs.to_string(),
            &cfg.warm.to_string(),
            &cfg.alloc_frac.to_string(),
            &pattern(engine).to_string(),
        ])
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            return Cell {
                error: Some(e.to_string()),
                ..Default::default()
            }
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
        let err = String::from_utf8_lossy(&out.stderr);
        return Cell {
            error: Some(err.trim().lines().last().unwrap_or("no result").to_string()),
            ..Default::default()
        };
    };
    let kv: BTreeMap<&str, &str> = line[7..]
        .split(' ')
        .filter_map(|t| t.split_once('='))
        .collect();
    let mut c = Cell {
        ops: kv.get("ops").and_then(|v| v.parse().ok()).unwrap_or(0),
        secs: kv.get("secs").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        hwm_kib: kv.get("hwm_kib").and_then(|v| v.parse().ok()).unwrap_or(0),
        ..Default::default()
    };
    if w.kind != Kind::Read && engine != "null" {
        let samples: Vec<(u64, usize)> = kv
            .get("samples")
            .unwrap_or(&"")
            .split(',')
            .filter_map(|s| s.split_once(':'))
            .filter_map(|(o, l)| Some((o.parse().ok()?, l.parse().ok()?)))
            .collect();
        let fmt = if engine == "raw" { "raw" } else { "qcow2" };
        let img = PathBuf::from(kv.get("image").copied().unwrap_or(""));
        c.verify = verify(fmt, &img, &samples, pattern(engine));
        if w.kind == Kind::Alloc {
            let _ = cell::to_trash(&img);
        }
    }
    c
}

/// Wall-clock seconds of one `qemu-img bench` process, and its own figure.
fn qemu_bench_once(
    cfg: &Config,
    w: &Workload,
    depth: usize,
    image: &Path,
    count: u64,
    pat: u8,
) -> Result<(f64, f64), String> {
    let img = image.to_string_lossy();
    let spec;
    let mut args: Vec<String> = vec![
        "bench".into(),
        "-i".into(),
        cfg.aio.clone(),
        "-d".into(),
        depth.to_string(),
    ];
    args.extend([
        "-c".into(),
        count.to_string(),
        "-s".into(),
        w.bs.to_string(),
    ]);
    if w.pattern == Pattern::Strided {
        args.extend(["-S".into(), work::STRIDE.to_string()]);
    }
    if w.kind != Kind::Read {
        args.extend(["-w".into(), format!("--pattern={pat}")]);
    }
    if w.small_l2 {
        spec = format!("driver=qcow2,file.filename={img},l2-cache-size=64k");
        args.extend(["--image-opts".into(), spec]);
    } else {
        args.extend(["-f".into(), "qcow2".into(), img.to_string()]);
    }
    let t = Instant::now();
    let out = sh(Command::new("qemu-img").args(&args))?;
    let wall = t.elapsed().as_secs_f64();
    let own = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("qemu-img bench: no timing in {out:?}"))?;
    Ok((wall, own))
}

/// A `qemu-img bench` cell. Reads: its own timing, count sized from a
/// warm-up run. Writes: `qemu-img bench` stops its clock before the image is
/// flushed (the flush happens at close), so a write cell is the process's
/// wall time minus that of a 1-request run: the final flush is inside.
fn qemu_cell(cfg: &Config, w: &Workload, depth: usize, im: &Images) -> Cell {
    let engine = if depth == 1 { "qemu-d1" } else { "qemu-d32" };
    let pat = pattern(engine);
    let r = (|| -> Result<Cell, String> {
        match w.kind {
            Kind::Read | Kind::Overwrite => {
                let image = if w.kind == Kind::Read {
                    &im.full_q
                } else {
                    &im.ow_q
                };
                let c0 = ((DISK / w.bs as u64) / 8).min(32768);
                let c0 = if cfg.quick { c0 / 8 } else { c0 };
                let (_, own0) = qemu_bench_once(cfg, w, depth, image, c0, pat)?;
                let count = ((c0 as f64 / own0.max(1e-6)) * cfg.secs).max(c0 as f64) as u64;
                if w.kind == Kind::Read {
                    let (_, own) = qemu_bench_once(cfg, w, depth, image, count, pat)?;
                    return Ok(Cell {
                        ops: count,
                        secs: own,
                        ..Default::default()
                    });
                }
                let (w1, _) = qemu_bench_once(cfg, w, depth, image, 1, pat)?;
                let (wn, _) = qemu_bench_once(cfg, w, depth, image, count, pat)?;
                let samples: Vec<(u64, usize)> = (0..4).map(|k| (k * w.bs as u64, w.bs)).collect();
                let verify = verify("qcow2", image, &samples, pat);
                Ok(Cell {
                    ops: count - 1,
                    secs: wn - w1,
                    verify,
                    ..Default::default()
                })
            }
            Kind::Alloc => {
                let copy = im.dir.join(format!("alloc-{engine}.qcow2"));
                let count = (((DISK / w.bs as u64) as f64) * cfg.alloc_frac) as u64;
                std::fs::copy(&im.empty_q, &copy).map_err(|e| e.to_string())?;
                let (w1, _) = qemu_bench_once(cfg, w, depth, &copy, 1, pat)?;
                cell::to_trash(&copy).map_err(|e| e.to_string())?;
                std::fs::copy(&im.empty_q, &copy).map_err(|e| e.to_string())?;
                sh(&mut Command::new("sync"))?;
                let (wn, _) = qemu_bench_once(cfg, w, depth, &copy, count, pat)?;
                let samples: Vec<(u64, usize)> = [0, 1, count / 2, count - 1]
                    .iter()
                    .map(|k| (k * w.bs as u64, w.bs))
                    .collect();
                let verify = verify("qcow2", &copy, &samples, pat);
                let _ = cell::to_trash(&copy);
                Ok(Cell {
                    ops: count - 1,
                    secs: wn - w1,
                    verify,
                    ..Default::default()
                })
            }
        }
    })();
    r.unwrap_or_else(|e| Cell {
        error: Some(e),
        ..Default::default()
    })
}

fn fmt_iops(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v >= 1e6 => format!("{:.2} M", v / 1e6),
        Some(v) => format!("{:.0} k", v / 1e3),
    }
}

fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "n/a".into(),
    }
}

type Results = BTreeMap<(String, String, usize), Cell>;

fn get(r: &Results, w: &str, e: &str, t: usize) -> Option<f64> {
    r.get(&(w.to_string(), e.to_string(), t))
        .and_then(Cell::iops)
}

fn one_cell(cfg: &Config, im: &Images, w: &Workload, e: &str, t: usize) -> Cell {
    if !im.tmpfs && w.kind != Kind::Alloc {
        let raw = e == "raw";
        warm_cache(match w.kind {
            Kind::Read if raw => &im.full_r,
            Kind::Read => &im.full_q,
            _ if raw => &im.ow_r,
            _ => &im.ow_q,
        });
    }
    match e {
        "qemu-d1" => qemu_cell(cfg, w, 1, im),
        "qemu-d32" => qemu_cell(cfg, w, 32, im),
        _ => {
            let raw = e == "raw";
            let ext = if raw { "raw" } else { "qcow2" };
            let unused = im.dir.join("unused");
            let (image, scratch) = match w.kind {
                Kind::Read => (if raw { &im.full_r } else { &im.full_q }, unused),
                Kind::Overwrite => (if raw { &im.ow_r } else { &im.ow_q }, unused),
                Kind::Alloc => (&im.empty_q, im.dir.join(format!("alloc-{e}-{t}.{ext}"))),
            };
            cell_process(cfg, e, w, t, image, &scratch)
        }
    }
}

/// Best rate of two runs of a cell, worst verification; a run that failed
/// (e.g. a crash of qemu-img) is noted, and the other run kept.
fn merge(a: Cell, b: Cell) -> Cell {
    match (&a.error, &b.error) {
        (Some(e), None) | (None, Some(e)) => {
            let mut good = if a.error.is_none() {
                a.clone()
            } else {
                b.clone()
            };
            let _ = write!(
                good.verify,
                "{}one of the 2 runs failed: {e}",
                if good.verify.is_empty() { "" } else { "; " }
            );
            return good;
        }
        _ => {}
    }
    let verify = if a.verify.starts_with("FAIL") || b.verify.is_empty() {
        a.verify.clone()
    } else {
        b.verify.clone()
    };
    let error = a.error.clone().or(b.error.clone());
    let mut best = if b.iops().unwrap_or(0.0) > a.iops().unwrap_or(0.0) {
        b
    } else {
        a
    };
    best.verify = verify;
    best.error = error;
    best
}

fn run_fs(cfg: &Config, root: &Path, log: &mut dyn FnMut(&str)) -> Result<Results, String> {
    log(&format!("== images on {} ==", root.display()));
    let t0 = Instant::now();
    let im = make_images(root)?;
    log(&format!(
        "images created in {:.1} s",
        t0.elapsed().as_secs_f64()
    ));
    let mut res: Results = BTreeMap::new();
    let wanted = |w: &Workload| {
        cfg.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|n| n == w.name))
    };
    // (workload, engines, threads) groups, in table order.
    let mut groups: Vec<(Workload, Vec<&str>, usize)> = Vec::new();
    for w in WORKLOADS.iter().filter(|w| wanted(w)) {
        let linear = matches!(w.pattern, Pattern::Seq | Pattern::Strided);
        let engines = ENGINES
            .iter()
            .copied()
            .filter(|e| linear || !e.starts_with("qemu"))
            .collect();
        groups.push((*w, engines, 1));
    }
    for name in MT_WORKLOADS {
        let w = work::workload(name).expect("workload");
        if wanted(&w) {
            for t in [2usize, 4] {
                groups.push((w, MT_ENGINES.to_vec(), t));
            }
        }
    }
    // Each group runs `reps` times, every other time in reverse engine order
    // (so no engine always runs right after the same neighbour); a cell keeps
    // its best rate and its worst verification.
    for (w, engines, t) in &groups {
        // On the disk file system every allocating pass leaves thousands of
        // scattered extents whose unlink costs seconds (online discard), so
        // allocating cells run once there.
        let reps = if !im.tmpfs && w.kind == Kind::Alloc {
            1
        } else {
            cfg.reps
        };
        for rep in 0..reps {
            let mut order = engines.clone();
            if rep % 2 == 1 {
                order.reverse();
            }
            for e in order {
                let cell = one_cell(cfg, &im, w, e, *t);
                log(&format!(
                    "{:<16} {:<9} {t}T {:>9} {} {}",
                    w.name,
                    e,
                    fmt_iops(cell.iops()),
                    cell.verify,
                    cell.error.as_deref().unwrap_or("")
                ));
                let key = (w.name.to_string(), e.to_string(), *t);
                let merged = match res.remove(&key) {
                    None => cell,
                    Some(old) => merge(old, cell),
                };
                res.insert(key, merged);
            }
        }
    }
    // The trash (used allocation images) goes last, in the background: see
    // `cell::to_trash`. Everything else is contiguous and quick to free.
    let trash = im.dir.join("trash");
    if trash.exists() {
        let later = root.join(format!("qcow2kit-compare-trash.{}", std::process::id()));
        let _ = std::fs::rename(&trash, &later);
        let _ = std::fs::remove_dir_all(&im.dir);
        if im.tmpfs {
            let _ = std::fs::remove_dir_all(&later);
        } else {
            log(&format!(
                "deleting {} in the background (online discard is slow)",
                later.display()
            ));
            let _ = Command::new("sh")
                .args([
                    "-c",
                    &format!("nohup rm -rf '{}' >/dev/null 2>&1 &", later.display()),
                ])
                .status();
        }
    } else {
        let _ = std::fs::remove_dir_all(&im.dir);
    }
    Ok(res)
}

/// Configured cache bytes of qcow2kit for a workload (L2 + refcount).
fn kit_cache_bytes(w: &Workload) -> u64 {
    let o = qcow2kit::OpenOptions::new();
    let o = if w.small_l2 {
        o.l2_cache_size(64 << 10)
    } else {
        o
    };
    qcow2kit::options::cache_config(&o, DISK, work::CLUSTER, 8)
        .map(|c| c.l2_cache_bytes + c.refcount_cache_bytes)
        .unwrap_or(0)
}

fn tables(r: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | raw file | qemu-img bench d1 | qemu-img bench d32 | imago (sync) | qcow2-rs | **qcow2kit** | qcow2kit on null | qcow2kit/raw | qcow2kit/best peer | qcow2kit peak RSS (harness baseline) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for w in WORKLOADS {
        if !r.keys().any(|k| k.0 == w.name) {
            continue;
        }
        let v = |e: &str| get(r, w.name, e, 1);
        let cellf = |e: &str| {
            let mut t = fmt_iops(v(e));
            if w.bs > 4096 {
                if let Some(x) = v(e) {
                    let _ = write!(t, " ({:.0} MiB/s)", x * w.bs as f64 / (1 << 20) as f64);
                }
            }
            if let Some(c) = r.get(&(w.name.to_string(), e.to_string(), 1)) {
                if let Some(err) = &c.error {
                    t = format!("error: {}", err.chars().take(60).collect::<String>());
                }
                if c.verify.starts_with("FAIL") {
                    t.push_str(" **(verify FAIL)**");
                }
            }
            t
        };
        let best_peer = match (v("imago"), v("qcow2-rs")) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let kit = r.get(&(w.name.to_string(), "qcow2kit".to_string(), 1));
        let rawc = r.get(&(w.name.to_string(), "raw".to_string(), 1));
        let rss = match (kit, rawc) {
            (Some(k), Some(b)) if k.hwm_kib > 0 => format!(
                "{:.1} MiB ({:.1}); caches {} KiB",
                k.hwm_kib as f64 / 1024.0,
                b.hwm_kib as f64 / 1024.0,
                kit_cache_bytes(w) / 1024
            ),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | {} | {} | {} |",
            w.label,
            cellf("raw"),
            cellf("qemu-d1"),
            cellf("qemu-d32"),
            cellf("imago"),
            cellf("qcow2-rs"),
            cellf("qcow2kit"),
            cellf("null"),
            fmt_ratio(v("qcow2kit"), v("raw")),
            fmt_ratio(v("qcow2kit"), best_peer),
            rss
        );
    }
    let _ = writeln!(s);
    if MT_WORKLOADS
        .iter()
        .any(|w| r.keys().any(|k| k.0 == *w && k.2 > 1))
    {
        let _ = writeln!(
            s,
            "Threads sharing one image (qcow2-rs: n/a, its device is not `Sync`):"
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "| workload | engine | 1 thread | 2 threads | 4 threads | 2T/1T | 4T/1T |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for w in MT_WORKLOADS {
            for e in MT_ENGINES {
                let (a, b, c) = (get(r, w, e, 1), get(r, w, e, 2), get(r, w, e, 4));
                let _ = writeln!(
                    s,
                    "| {w} | {e} | {} | {} | {} | {} | {} |",
                    fmt_iops(a),
                    fmt_iops(b),
                    fmt_iops(c),
                    fmt_ratio(b, a),
                    fmt_ratio(c, a)
                );
            }
        }
        let _ = writeln!(s);
    }
    // The issue's targets.
    let _ = writeln!(s, "Targets of issue 14 (same run):");
    let _ = writeln!(s);
    let _ = writeln!(s, "| target | measured | goal | met |");
    let _ = writeln!(s, "|---|---|---|---|");
    let mut target = |name: &str, v: Option<f64>, goal: f64| {
        let (m, ok) = match v {
            Some(v) => (format!("{v:.2}×"), if v >= goal { "yes" } else { "**no**" }),
            None => ("n/a".into(), "n/a"),
        };
        let _ = writeln!(s, "| {name} | {m} | ≥ {goal}× | {ok} |");
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let best = |w: &str| match (get(r, w, "imago", 1), get(r, w, "qcow2-rs", 1)) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    for w in ["rand-read", "seq-read"] {
        target(
            &format!("{w}: qcow2kit / raw pread"),
            ratio(get(r, w, "qcow2kit", 1), get(r, w, "raw", 1)),
            0.95,
        );
        target(
            &format!("{w}: qcow2kit / faster of imago, qcow2-rs"),
            ratio(get(r, w, "qcow2kit", 1), best(w)),
            1.15,
        );
    }
    target(
        "rand-alloc: qcow2kit / imago",
        ratio(
            get(r, "rand-alloc", "qcow2kit", 1),
            get(r, "rand-alloc", "imago", 1),
        ),
        1.3,
    );
    target(
        "seq-alloc: qcow2kit / raw pwrite (sparse)",
        ratio(
            get(r, "seq-alloc", "qcow2kit", 1),
            get(r, "seq-alloc", "raw", 1),
        ),
        0.7,
    );
    for w in ["seq-overwrite", "rand-overwrite"] {
        target(
            &format!("{w}: qcow2kit / raw pwrite"),
            ratio(get(r, w, "qcow2kit", 1), get(r, w, "raw", 1)),
            0.9,
        );
    }
    for (w, g) in [
        ("rand-read", 1.7),
        ("rand-overwrite", 1.6),
        ("rand-alloc", 1.4),
    ] {
        target(
            &format!("{w}: qcow2kit 2 threads / 1 thread"),
            ratio(get(r, w, "qcow2kit", 2), get(r, w, "qcow2kit", 1)),
            g,
        );
    }
    target(
        "strided-read: qcow2kit / qemu-img bench d1",
        ratio(
            get(r, "strided-read", "qcow2kit", 1),
            get(r, "strided-read", "qemu-d1", 1),
        ),
        1.0,
    );
    // Peak RSS: qcow2kit's VmHWM minus the raw loop's (the harness itself:
    // binary, offset lists, buffers) against the configured caches + 4 MiB.
    let mut worst: Option<(f64, &str)> = None;
    for ((w, e, t), c) in r {
        if e != "qcow2kit" || *t != 1 || c.hwm_kib == 0 {
            continue;
        }
        let Some(base) = r.get(&(w.clone(), "raw".into(), 1)).map(|b| b.hwm_kib) else {
            continue;
        };
        let wl = work::workload(w).expect("workload");
        let budget = kit_cache_bytes(&wl) as f64 / 1024.0 + 4096.0;
        let used = c.hwm_kib.saturating_sub(base) as f64;
        let frac = used / budget;
        if worst.is_none_or(|(f, _)| frac > f) {
            worst = Some((frac, wl.name));
        }
    }
    let (m, ok) = match worst {
        Some((f, w)) => (
            format!("{:.0}% of budget (worst: {w})", f * 100.0),
            if f <= 1.0 { "yes" } else { "**no**" },
        ),
        None => ("n/a".into(), "n/a"),
    };
    let _ = writeln!(
        s,
        "| peak RSS − harness baseline ≤ caches + 4 MiB | {m} | ≤ 100% | {ok} |"
    );
    s
}

fn verification(r: &Results) -> String {
    let mut s = String::new();
    for ((w, e, t), c) in r {
        if let Some(err) = &c.error {
            let _ = writeln!(s, "- {w} / {e} / {t}T: **error**: {err}");
        } else if !c.verify.is_empty() {
            let _ = writeln!(s, "- {w} / {e} / {t}T: {}", c.verify);
        }
    }
    s
}

fn run_all(a: &[String]) -> Result<(), String> {
    let mut cfg = Config {
        quick: false,
        secs: 1.0,
        warm: 0.2,
        alloc_frac: 1.0,
        only: None,
        fs: vec![PathBuf::from("/var/tmp"), PathBuf::from("/dev/shm")],
        out: None,
        aio: "io_uring".into(),
        reps: 2,
    };
    let mut i = 0;
    while i < a.len() {
        match a[i].as_str() {
            "--quick" => {
                cfg.quick = true;
                cfg.secs = 0.2;
                cfg.warm = 0.05;
                cfg.alloc_frac = 0.125;
                cfg.reps = 1;
            }
            "--reps" => {
                i += 1;
                cfg.reps = a
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or("--reps needs a number")?;
            }
            "--only" => {
                i += 1;
                cfg.only = Some(
                    a.get(i)
                        .ok_or("--only needs a value")?
                        .split(',')
                        .map(String::from)
                        .collect(),
                );
            }
            "--fs" => {
                i += 1;
                cfg.fs = a
                    .get(i)
                    .ok_or("--fs needs a value")?
                    .split(',')
                    .map(PathBuf::from)
                    .collect();
            }
            "--out" => {
                i += 1;
                cfg.out = Some(a.get(i).ok_or("--out needs a value")?.into());
            }
            "--secs" => {
                i += 1;
                cfg.secs = a
                    .get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or("--secs needs a number")?;
            }
            o => return Err(format!("unknown option {o}")),
        }
        i += 1;
    }
    // io_uring if this qemu-img has it, else the thread pool (`native` needs
    // O_DIRECT, which tmpfs does not have and the page-cache runs must not use).
    let probe = std::env::temp_dir().join(format!(
        "qcow2kit-compare-probe.{}.qcow2",
        std::process::id()
    ));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        probe.to_str().ok_or("path")?,
        "1M",
    ])?;
    if qemu_img(&[
        "bench",
        "-i",
        "io_uring",
        "-c",
        "1",
        "-f",
        "qcow2",
        probe.to_str().ok_or("path")?,
    ])
    .is_err()
    {
        cfg.aio = "threads".into();
    }
    let _ = std::fs::remove_file(&probe);

    let mut report = String::new();
    let t0 = Instant::now();
    let mut all = Vec::new();
    for root in cfg.fs.clone() {
        let mut log = |m: &str| eprintln!("{m}");
        let r = run_fs(&cfg, &root, &mut log)?;
        all.push((root, r));
    }
    for (root, r) in &all {
        let kind = if cell::on_tmpfs(&root.join("x")) {
            "tmpfs"
        } else {
            "disk file system, page cache"
        };
        let _ = writeln!(report, "### Images on {} ({kind})\n", root.display());
        report.push_str(&tables(r));
        let _ = writeln!(report, "\nVerification of the writing cells (`qemu-img check` + `qemu-io read -P` of samples):\n");
        report.push_str(&verification(r));
        report.push('\n');
    }
    let _ = writeln!(
        report,
        "qemu-img bench AIO: `{}`; total harness time {:.0} s.",
        cfg.aio,
        t0.elapsed().as_secs_f64()
    );
    print!("{report}");
    if let Some(out) = &cfg.out {
        std::fs::write(out, &report).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    Ok(())
}
