//! `qcow2-img compare` (`cli.md` §18.2, qemu-img's `img_compare`): compares
//! the guest contents of two images (through their backing chains) run by
//! run, reading only where one of them may hold data.

use crate::common::{parse_args, CmdResult, Fail};
use crate::convert_src::Src;
use crate::io::CacheMode;
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::OpenOptions;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(short = 'f')]
    fmt1: Option<String>,
    #[arg(short = 'F')]
    fmt2: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'T')]
    cache: Option<String>,
    #[arg(short = 'p')]
    progress: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 's')]
    strict: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "compare";
/// qemu-img's `IO_BUF_SIZE`: the most compared per read.
const IO_BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

/// Runs `compare`; the exit code is the result (0 identical, 1 different,
/// 2 an image could not be opened, 4 a read failed).
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::COMPARE);
        return Ok(());
    }
    if a.rest.len() != 2 {
        return Err(Fail::Usage("Expecting two image file names".into(), SUB));
    }
    let cache = a.cache.as_deref().unwrap_or("writeback");
    let Some(cache) = CacheMode::parse(cache) else {
        return Err(exit_with(
            Fail::Msg(format!("Invalid source cache option: {cache}")),
            2,
        ));
    };
    let (n1, n2) = (&a.rest[0], &a.rest[1]);
    let opts = cache
        .apply(crate::common::open_options().read_only(true))
        .force_share(a.force_share);
    let open = |name: &str, fmt: Option<&str>| {
        if a.image_opts {
            // Both names are option strings (`driver=qcow2,file.filename=F,
            // encrypt.key-secret=ID,...`), as qemu-img takes them.
            crate::common::open_image_arg(name, true, fmt, opts.clone(), true)
                .map(|i| Src::Qcow2(Box::new(i)))
        } else {
            open(name, fmt, &opts, cache.direct())
        }
        .map_err(|f| exit_with(f, 2))
    };
    let s1 = open(n1, a.fmt1.as_deref())?;
    let s2 = open(n2, a.fmt2.as_deref())?;
    let quiet = a.quiet;
    let mut progress = Progress::new(a.progress && !quiet);
    let say = |s: &str| {
        if !quiet {
            println!("{s}");
        }
    };
    let code = compare(&s1, n1, &s2, n2, a.strict, &mut progress, &say)?;
    drop(progress);
    if code == 0 {
        Ok(())
    } else {
        Err(Fail::Exit(code))
    }
}

/// Prints `f` now and exits with `code`.
fn exit_with(f: Fail, code: u8) -> Fail {
    f.report();
    Fail::Exit(code)
}

/// Opens `name` with format `fmt` (probed when absent: qcow2 by its magic,
/// anything else raw, as QEMU probes).
fn open(name: &str, fmt: Option<&str>, opts: &OpenOptions, direct: bool) -> Result<Src, Fail> {
    let fmt = match fmt {
        Some(f) => f.to_owned(),
        None => {
            let mut magic = [0u8; 4];
            let is_qcow2 = std::fs::File::open(name)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
                .is_ok()
                && magic == *b"QFI\xfb";
            if is_qcow2 || !std::path::Path::new(name).exists() {
                "qcow2".into()
            } else {
                "raw".into()
            }
        }
    };
    match fmt.as_str() {
        "qcow2" => Ok(Src::Qcow2(Box::new(crate::common::open_ro_with(
            name,
            opts.clone(),
        )?))),
        "raw" => Src::open_raw(name, direct),
        other => Err(Fail::Msg(format!(
            "Could not open '{name}': Unknown driver '{other}'"
        ))),
    }
}

/// qemu-img's progress for compare: printed when it moved by more than 2
/// points since the last print, and at 100.
struct Meter<'a> {
    progress: &'a mut Progress,
    base: u64,
    last: f32,
}

impl Meter<'_> {
    fn at(&mut self, offset: u64) {
        let current = (offset as f32 / self.base.max(1) as f32 * 100.0).min(100.0);
        if current > self.last + 2.0 || current >= 100.0 {
            self.last = current;
            self.progress.set(offset, self.base);
        }
    }
}

/// The comparison proper; returns the exit code.
fn compare(
    s1: &Src,
    n1: &str,
    s2: &Src,
    n2: &str,
    strict: bool,
    progress: &mut Progress,
    say: &dyn Fn(&str),
) -> Result<u8, Fail> {
    let (size1, size2) = (s1.size(), s2.size());
    let e1 = s1.extents(n1).map_err(|e| Fail::Msg(e.qemu_message()))?;
    let e2 = s2.extents(n2).map_err(|e| Fail::Msg(e.qemu_message()))?;
    let total = size1.min(size2);
    let base = size1.max(size2);
    progress.start();
    let mut meter = Meter {
        progress,
        base,
        last: 0.0,
    };
    if strict && size1 != size2 {
        say("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let mut offset = 0u64;
    while offset < total {
        let (st1, p1) = e1
            .status(offset, size1 - offset)
            .map_err(|_| status_fail(n1))?;
        let (st2, p2) = e2
            .status(offset, size2 - offset)
            .map_err(|_| status_fail(n2))?;
        let mut chunk = p1.min(p2).min(total - offset);
        if strict && st1 != st2 {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            return Ok(1);
        }
        if st1.zero && st2.zero {
            // Both read as zeroes.
        } else if st1.allocated == st2.allocated {
            if st1.allocated {
                chunk = chunk.min(IO_BUF);
                read(s1, n1, offset, chunk, &mut buf1)?;
                read(s2, n2, offset, chunk, &mut buf2)?;
                if let Some(at) = first_diff(&buf1, &buf2) {
                    say(&format!("Content mismatch at offset {}!", offset + at));
                    return Ok(1);
                }
            }
        } else {
            chunk = chunk.min(IO_BUF);
            let (s, n) = if st1.allocated { (s1, n1) } else { (s2, n2) };
            if let Some(code) = check_empty(s, n, offset, chunk, &mut buf1, say)? {
                return Ok(code);
            }
        }
        offset += chunk;
        meter.at(offset);
    }
    if size1 != size2 {
        say("Warning: Image size mismatch!");
        let (s, n, e, size) = if size1 > size2 {
            (s1, n1, &e1, size1)
        } else {
            (s2, n2, &e2, size2)
        };
        while offset < size {
            let (st, mut chunk) = e
                .status(offset, size - offset)
                .map_err(|_| status_fail(n))?;
            if st.allocated && !st.zero {
                chunk = chunk.min(IO_BUF);
                if let Some(code) = check_empty(s, n, offset, chunk, &mut buf1, say)? {
                    return Ok(code);
                }
            }
            offset += chunk;
            meter.at(offset);
        }
    }
    say("Images are identical.");
    Ok(0)
}

/// A failed block status query (exit 3).
fn status_fail(name: &str) -> Fail {
    exit_with(
        Fail::Msg(format!("Sector allocation test failed for {name}")),
        3,
    )
}

/// Reads `len` bytes at `offset` into `buf` (exit 4 on failure).
fn read(s: &Src, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<(), Fail> {
    buf.resize(len as usize, 0);
    s.read_at(buf, offset).map_err(|e| {
        exit_with(
            Fail::Msg(format!(
                "Error while reading offset {offset} of {name}: {}",
                e.errno_text()
            )),
            4,
        )
    })
}

/// The start of the first 512-byte sector where `a` and `b` differ.
fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(SECTOR)
        .zip(b.chunks(SECTOR))
        .position(|(x, y)| x != y)
        .map(|i| (i * SECTOR) as u64)
}

/// qemu-img's `check_empty_sectors`: the run must read as zeroes; reports
/// the first non-zero sector (`Some(1)`), `Some(4)` after a failed read.
fn check_empty(
    s: &Src,
    name: &str,
    offset: u64,
    len: u64,
    buf: &mut Vec<u8>,
    say: &dyn Fn(&str),
) -> Result<Option<u8>, Fail> {
    read(s, name, offset, len, buf)?;
    match buf.chunks(SECTOR).position(|c| c.iter().any(|b| *b != 0)) {
        Some(i) => {
            say(&format!(
                "Content mismatch at offset {}!",
                offset + (i * SECTOR) as u64
            ));
            Ok(Some(1))
        }
        None => Ok(None),
    }
}
