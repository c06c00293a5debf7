//! `qcow2-img io` (≙ qemu-io, `cli.md` §12): runs `-c` commands in order
//! against one open image. Messages, streams and exit codes follow
//! qemu-io 10.0.2: results and most command failures on stdout, `qemu-io:`
//! errors and command-lookup errors on stderr; exit 1 if any command failed.
//!
//! Cache modes (`-t`, `-n`, and the same options of `open`) are qemu-io's:
//! write-through by default (a flush after every write, write-zeroes and
//! discard, whose failure fails the request), `none`/`directsync` open the
//! files with `O_DIRECT`, `unsafe` turns flushes into no-ops. A failed close
//! is reported as qemu-io reports it and, as there, leaves the exit code
//! alone.

use crate::common::{parse_args, Fail, PROG};
use clap::Parser;
use qcow2kit::options::{parse_size, SizeError};
use qcow2kit::Extent;
use qcow2kit::{Error, Event, Image, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "io_cmds.rs"]
mod io_cmds;
use io_cmds::help;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true)]
    cmds: Vec<String>,
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    #[arg(short = 'C', long = "copy-on-read")]
    copy_on_read: bool,
    #[arg(short = 'k', long = "native-aio")]
    native_aio: bool,
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    #[arg(short = 'd', long = "discard")]
    discard: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "io";

/// `qcow2-img io --help`: qemu-io's usage, with the options this
/// implementation accepts (in qemu-io's order and words), and the exit codes.
const USAGE: &str = "\
Usage: qcow2-img io [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser

  --object OBJECTDEF   define an object such as 'secret' for
                       passwords and/or encryption keys
  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
                       (qcow2 or raw)
  -r, --read-only      export read-only
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read
                       (accepted for compatibility, no effect)
  -k, --native-aio     use kernel AIO implementation
                       (accepted for compatibility, no effect)
  -t, --cache=MODE     use the given cache mode for the image
                       (writethrough [default], writeback, none,
                       directsync, unsafe)
  -d, --discard=MODE   use the given discard mode for the image
                       (accepted for compatibility, no effect)
  -U, --force-share    force shared permissions
  -h, --help           display this help and exit

See 'qcow2-img io -c help' for information on available commands:
read, write, discard, flush, map, open, close, sleep, abort, help, quit,
length, info, alloc, truncate, readv, writev, aio_read, aio_write,
aio_flush.

Exit codes:
  0    every command succeeded (or there was none)
  1    bad argument, the file cannot be opened, or a command failed
  134  the abort command ran (the process ends with SIGABRT)
";

/// qemu-io's `BDRV_REQUEST_MAX_BYTES`.
const REQUEST_MAX_BYTES: u64 = 2147483136;

/// Runs `io`.
pub fn run(argv: &[String]) -> Result<(), Fail> {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        print!("{USAGE}");
        return Ok(());
    }
    let _ = (a.copy_on_read, a.native_aio, &a.discard);
    let cache = match CacheMode::from_args(argv, a.cache.as_deref(), a.nocache) {
        Ok(c) => c,
        Err(m) => return Err(Fail::Msg(m)),
    };
    if a.rest.len() > 1 {
        print!("{USAGE}");
        return Err(Fail::Exit(1));
    }
    if a.image_opts && a.format.is_some() {
        return Err(Fail::Msg(
            "--image-opts and -f are mutually exclusive".into(),
        ));
    }
    let mut state = State {
        img: None,
        writethrough: cache.writethrough,
        quit: false,
    };
    if let Some(arg) = a.rest.first() {
        let r = if a.image_opts {
            // The cache mode and -r set the defaults; the option string may
            // override them (cache.direct=..., read-only=...).
            let mut o = cache
                .apply(crate::common::open_options())
                .read_only(a.read_only);
            o.apply_qemu_str(arg)
                .map_err(|e| format!("can't open: {e}"))
                .and_then(|_| {
                    check_read_only(&o, a.read_only).map_err(|m| format!("can't open: {m}"))?;
                    let share = a.force_share || o.get_force_share();
                    state.open(None, o.force_share(share))
                })
        } else {
            check_format(a.format.as_deref(), arg).and_then(|_| {
                let o = cache
                    .apply(crate::common::open_options())
                    .read_only(a.read_only)
                    .force_share(a.force_share)
                    .with_filename(PathBuf::from(arg));
                state.open(Some(arg), o)
            })
        };
        if let Err(m) = r {
            return Err(Fail::Msg(m));
        }
    }
    let mut failed = false;
    for cmd in &a.cmds {
        if !state.command(cmd) {
            failed = true;
        }
        if state.quit {
            break;
        }
    }
    if let Some(img) = state.img.take() {
        // Like qemu-io: a failed close is reported but does not change
        // the exit code.
        report_close(img);
    }
    if failed {
        Err(Fail::Exit(1))
    } else {
        Ok(())
    }
}

/// qemu-io's read-only rules for an option string, given whether `-r` was
/// given (`-r` only sets the default of `read-only`, as in qemu-io, where it
/// decides whether the block backend asks for write permission):
/// * an explicit `read-only=off` wins over `-r`: the image opens writable;
/// * an explicit `read-only=on` without `-r` is refused, because the
///   backend asks for write permission the node cannot give.
fn check_read_only(o: &OpenOptions, dash_r: bool) -> Result<(), String> {
    if o.get_read_only() && !dash_r {
        return Err("Block node is read-only".into());
    }
    Ok(())
}

fn check_format(fmt: Option<&str>, name: &str) -> Result<(), String> {
    match fmt {
        None | Some("qcow2") => Ok(()),
        Some("raw") => Err(format!(
            "can't open device {name}: Format 'raw' is not supported by {PROG} (qcow2 only)"
        )),
        Some(other) => Err(format!(
            "can't open device {name}: Unknown driver '{other}'"
        )),
    }
}

struct State {
    img: Option<Image>,
    /// Flush after every write, write-zeroes and discard (qemu-io's
    /// default cache mode, `writethrough`).
    writethrough: bool,
    /// `quit` ran: the remaining commands are skipped.
    quit: bool,
}

/// One command of the table: name, alias, argument counts, needs write permission.
struct Cmd {
    name: &'static str,
    alt: Option<&'static str>,
    argmin: usize,
    argmax: Option<usize>,
    needs_file: bool,
    write: bool,
    usage: &'static str,
}

const CMDS: &[Cmd] = &[
    Cmd {
        name: "read",
        alt: Some("r"),
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: false,
        usage: "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
    },
    Cmd {
        name: "write",
        alt: Some("w"),
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: true,
        usage: "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset",
    },
    Cmd {
        name: "discard",
        alt: Some("d"),
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: true,
        usage: "discard [-Cq] off len -- discards a number of bytes at a specified offset",
    },
    Cmd {
        name: "flush",
        alt: Some("f"),
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "flush -- flush all in-core file state to disk",
    },
    Cmd {
        name: "map",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "map  -- prints the allocated areas of a file",
    },
    Cmd {
        name: "open",
        alt: Some("o"),
        argmin: 1,
        argmax: None,
        needs_file: false,
        write: false,
        usage: "open [-rsCnkU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
    },
    Cmd {
        name: "close",
        alt: Some("c"),
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "close -- close the current open file",
    },
    Cmd {
        name: "sleep",
        alt: None,
        argmin: 1,
        argmax: Some(1),
        needs_file: false,
        write: false,
        usage: "sleep -- waits for the given value in milliseconds",
    },
    Cmd {
        name: "abort",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        needs_file: false,
        write: false,
        usage: "abort -- simulate a program crash using abort(3)",
    },
    Cmd {
        name: "help",
        alt: Some("?"),
        argmin: 0,
        argmax: Some(1),
        needs_file: false,
        write: false,
        usage: "help [command] -- help for one or all commands",
    },
    Cmd {
        name: "quit",
        alt: Some("q"),
        argmin: 0,
        argmax: Some(0),
        needs_file: false,
        write: false,
        usage: "quit -- exit the program",
    },
    Cmd {
        name: "length",
        alt: Some("l"),
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "length -- gets the length of the current file",
    },
    Cmd {
        name: "info",
        alt: Some("i"),
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "info -- prints information about the current file",
    },
    Cmd {
        name: "alloc",
        alt: Some("a"),
        argmin: 1,
        argmax: Some(2),
        needs_file: true,
        write: false,
        usage: "alloc offset [count] -- checks if offset is allocated in the file",
    },
    Cmd {
        name: "truncate",
        alt: Some("t"),
        argmin: 1,
        argmax: Some(3),
        needs_file: true,
        write: true,
        usage: "truncate [-m prealloc_mode] off -- truncates the current file at the given offset",
    },
    Cmd {
        name: "readv",
        alt: None,
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: false,
        usage: "readv [-Cqrv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
    },
    Cmd {
        name: "writev",
        alt: None,
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: true,
        usage: "writev [-Cfqr] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
    },
    Cmd {
        name: "aio_read",
        alt: None,
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: false,
        usage: "aio_read [-Ciqrv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
    },
    Cmd {
        name: "aio_write",
        alt: None,
        argmin: 2,
        argmax: None,
        needs_file: true,
        write: true,
        usage: "aio_write [-Cfiqruz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
    },
    Cmd {
        name: "aio_flush",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        needs_file: true,
        write: false,
        usage: "aio_flush -- completes all outstanding aio requests",
    },
];

/// Outcome of a command: `false` = failed (exit code 1 at the end).
type Done = bool;

impl State {
    /// Opens an image; the error is the text after `qcow2-img: `.
    fn open(&mut self, name: Option<&str>, opts: OpenOptions) -> Result<(), String> {
        let prefix = match name {
            Some(n) => format!("can't open device {n}: "),
            None => "can't open: ".to_owned(),
        };
        if let Some(spec) = opts.file_backend() {
            // file.driver=nbd|quorum|blkdebug|null-co: the storage comes from the options.
            let storage = qcow2kit::storage::open_from_options(spec, opts.get_read_only())
                .map_err(|m| format!("{prefix}{m}"))?;
            let img = Image::open_storage(storage, &opts)
                .map_err(|e| format!("{prefix}{}", e.qemu_message()))?;
            self.img = Some(img);
            return Ok(());
        }
        let Some(path) = opts.filename().map(|p| p.to_path_buf()) else {
            return Err(format!(
                "{prefix}A block device must be specified for \"file\""
            ));
        };
        let shown = path.display().to_string();
        let img = Image::open(&path, &opts).map_err(|e| {
            let text = match e.inner() {
                Error::Io { .. } | Error::Open { .. } => {
                    format!("Could not open '{shown}': {}", e.qemu_message())
                }
                _ => e.qemu_message(),
            };
            format!("{prefix}{text}")
        })?;
        img.on_event(|ev| {
            if let Event::ImageCorrupted { .. } = ev {
                eprintln!("{ev}");
            }
        });
        self.img = Some(img);
        Ok(())
    }

    fn command(&mut self, line: &str) -> Done {
        let args: Vec<&str> = line.split([' ', '\t']).filter(|s| !s.is_empty()).collect();
        let Some(&name) = args.first() else {
            return true;
        };
        let Some(cmd) = CMDS.iter().find(|c| c.name == name || c.alt == Some(name)) else {
            eprintln!("command \"{name}\" not found");
            return false;
        };
        if cmd.needs_file && self.img.is_none() {
            eprintln!("no file open, try 'help open'");
            return false;
        }
        let n = args.len() - 1;
        if n < cmd.argmin || cmd.argmax.is_some_and(|m| n > m) {
            match cmd.argmax {
                None => eprintln!(
                    "bad argument count {n} to {name}, expected at least {} arguments",
                    cmd.argmin
                ),
                Some(m) if m == cmd.argmin => {
                    eprintln!("bad argument count {n} to {name}, expected {m} arguments")
                }
                Some(m) => eprintln!(
                    "bad argument count {n} to {name}, expected between {} and {m} arguments",
                    cmd.argmin
                ),
            }
            return false;
        }
        if cmd.write {
            if let Some(img) = &self.img {
                if img.is_read_only() && !img.is_disabled() {
                    eprintln!("{PROG}: Block node is read-only");
                    return false;
                }
            }
        }
        let rest = &args[1..];
        match cmd.name {
            "read" => self.read(cmd, rest),
            "write" => self.write(cmd, rest),
            "discard" => self.discard(cmd, rest),
            // A failed flush prints nothing in qemu-io; it only fails.
            "flush" => self.img.as_ref().is_some_and(|i| i.flush().is_ok()),
            "map" => self.map(),
            "open" => self.open_cmd(cmd, rest),
            "close" => {
                if let Some(img) = self.img.take() {
                    report_close(img);
                }
                true
            }
            "sleep" => sleep(rest[0]),
            "abort" => std::process::abort(),
            "help" => help(rest.first().copied()),
            "quit" => {
                self.quit = true;
                true
            }
            "length" => self.length(),
            "info" => self.info(),
            "alloc" => self.alloc(rest),
            "truncate" => self.truncate(cmd, rest),
            "readv" => self.readv(cmd, rest, false),
            "aio_read" => self.readv(cmd, rest, true),
            "writev" => self.writev(cmd, rest, false),
            "aio_write" => self.writev(cmd, rest, true),
            // Requests complete before their command returns: nothing waits.
            "aio_flush" => true,
            _ => false,
        }
    }

    fn read(&mut self, cmd: &Cmd, args: &[&str]) -> Done {
        let Some((opts, pos)) = getopt(cmd, args, "bCcqP:l:s:vra") else {
            return false;
        };
        if pos.len() != 2 {
            println!("{}", cmd.usage);
            return false;
        }
        let Some((offset, count)) = two_nums(pos[0], pos[1]) else {
            return false;
        };
        if count > REQUEST_MAX_BYTES {
            println!("length cannot exceed {REQUEST_MAX_BYTES}, given {}", pos[1]);
            return false;
        }
        let mut pattern = None;
        let mut pattern_offset = 0u64;
        let mut pattern_count = None;
        for (o, v) in &opts {
            match (o, v) {
                ('P', Some(v)) => match parse_pattern(v) {
                    Some(p) => pattern = Some(p),
                    None => return false,
                },
                ('s', Some(v)) => match cvtnum(v) {
                    Some(n) => pattern_offset = n,
                    None => return false,
                },
                ('l', Some(v)) => match cvtnum(v) {
                    Some(n) => pattern_count = Some(n),
                    None => return false,
                },
                _ => {}
            }
        }
        let has = |c: char| opts.iter().any(|(o, _)| *o == c);
        let (q, v, cflag) = (has('q'), has('v'), has('C'));
        let pattern_count = pattern_count.unwrap_or(count.saturating_sub(pattern_offset));
        if pattern.is_some() && pattern_offset.saturating_add(pattern_count) > count {
            println!("pattern verification range exceeds end of read data");
            return false;
        }
        let Some(img) = &self.img else { return false };
        let mut buf = vec![0xabu8; count as usize];
        let t1 = Instant::now();
        let r = img.read_at(&mut buf, offset);
        let t = t1.elapsed();
        if let Err(e) = r {
            println!("read failed: {}", e.errno_text());
            return false;
        }
        let mut ok = true;
        if let Some(p) = pattern {
            let lo = pattern_offset as usize;
            let hi = lo + pattern_count as usize;
            if buf[lo..hi].iter().any(|b| *b != p) {
                println!(
                    "Pattern verification failed at offset {}, {pattern_count} bytes",
                    offset + pattern_offset
                );
                ok = false;
            }
        }
        if q {
            return ok;
        }
        if v {
            dump_buffer(&buf, offset);
        }
        print_report("read", t, offset, count, count, cflag);
        ok
    }

    fn write(&mut self, cmd: &Cmd, args: &[&str]) -> Done {
        let Some((opts, pos)) = getopt(cmd, args, "bcCfnqruzP:s:") else {
            return false;
        };
        let has = |c: char| opts.iter().any(|(o, _)| *o == c);
        let (z, u, q, cflag) = (has('z'), has('u'), has('q'), has('C'));
        if has('b') && z {
            println!("-b and -z cannot be specified at the same time");
            return false;
        }
        if has('f') && (has('b') || has('c')) {
            println!("-f and -b or -c cannot be specified at the same time");
            return false;
        }
        if has('n') && !z {
            println!("-n requires -z to be specified");
            return false;
        }
        if u && !z {
            println!("-u requires -z to be specified");
            return false;
        }
        if usize::from(z) + usize::from(has('P')) + usize::from(has('s')) > 1 {
            println!("Only one of -z, -P, and -s can be specified at the same time");
            return false;
        }
        if pos.len() != 2 {
            println!("{}", cmd.usage);
            return false;
        }
        let mut pattern = 0xcdu8;
        for (o, v) in &opts {
            if let ('P', Some(v)) = (o, v) {
                match parse_pattern(v) {
                    Some(p) => pattern = p,
                    None => return false,
                }
            }
        }
        let Some((offset, count)) = two_nums(pos[0], pos[1]) else {
            return false;
        };
        if count > REQUEST_MAX_BYTES && !has('n') {
            println!("length cannot exceed {REQUEST_MAX_BYTES}, given {}", pos[1]);
            return false;
        }
        let Some(img) = &self.img else { return false };
        let t1 = Instant::now();
        let r = if has('s') {
            Err("Operation not supported".to_owned())
        } else if has('c') {
            let buf = vec![pattern; count as usize];
            img.write_compressed_at(&buf, offset)
                .map_err(|e| e.errno_text())
        } else if z {
            img.write_zeroes(offset, count, u)
                .map_err(|e| e.errno_text())
        } else {
            let buf = vec![pattern; count as usize];
            img.write_at(&buf, offset).map_err(|e| e.errno_text())
        };
        let r = r.and_then(|_| self.write_through());
        let t = t1.elapsed();
        if let Err(text) = r {
            println!("write failed: {text}");
            return false;
        }
        if !q {
            print_report("wrote", t, offset, count, count, cflag);
        }
        true
    }

    fn discard(&mut self, cmd: &Cmd, args: &[&str]) -> Done {
        let Some((opts, pos)) = getopt(cmd, args, "Cq") else {
            return false;
        };
        if pos.len() != 2 {
            println!("{}", cmd.usage);
            return false;
        }
        let Some((offset, count)) = two_nums(pos[0], pos[1]) else {
            return false;
        };
        let has = |c: char| opts.iter().any(|(o, _)| *o == c);
        let Some(img) = &self.img else { return false };
        let t1 = Instant::now();
        let r = img.discard(offset, count).map_err(|e| e.errno_text());
        let r = r.and_then(|_| self.write_through());
        let t = t1.elapsed();
        if let Err(text) = r {
            println!("discard failed: {text}");
            return false;
        }
        if !has('q') {
            print_report("discard", t, offset, count, count, has('C'));
        }
        true
    }

    fn map(&mut self) -> Done {
        let Some(img) = &self.img else { return false };
        if img.is_disabled() {
            eprintln!("{PROG}: Failed to query image length: No medium found");
            return false;
        }
        let size = img.size();
        let mut offset = 0u64;
        let mut run: Option<(bool, u64, u64)> = None; // (allocated, start, len)
        let print = |alloc: bool, start: u64, len: u64| {
            println!(
                "{} ({len:#x}) bytes {} at offset {} ({start:#x})",
                cvtstr(len as f64),
                if alloc {
                    "    allocated"
                } else {
                    "not allocated"
                },
                cvtstr(start as f64),
            );
        };
        while offset < size {
            let st = match img.block_status(offset, size - offset) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!(
                        "{PROG}: Failed to get allocation status: {}",
                        e.errno_text()
                    );
                    return false;
                }
            };
            let alloc = !matches!(st.extent, Extent::Unallocated);
            run = match run {
                Some((a, s, l)) if a == alloc => Some((a, s, l + st.len)),
                Some((a, s, l)) => {
                    print(a, s, l);
                    Some((alloc, offset, st.len))
                }
                None => Some((alloc, offset, st.len)),
            };
            offset += st.len;
        }
        if let Some((a, s, l)) = run {
            print(a, s, l);
        }
        true
    }

    fn open_cmd(&mut self, cmd: &Cmd, args: &[&str]) -> Done {
        let Some((opts, pos)) = getopt(cmd, args, "rsCnkUt:d:o:") else {
            return false;
        };
        // The open command has its own cache mode (default writethrough);
        // a bad one is refused while parsing the options, as in qemu-io.
        let mut cache = CacheMode::DEFAULT;
        for (c, v) in &opts {
            match (c, v) {
                ('n', _) => cache = cache.nocache(),
                ('t', Some(m)) => match CacheMode::parse(m) {
                    Some(c) => cache = c,
                    None => {
                        eprintln!("{PROG}: Invalid cache option: {m}");
                        return false;
                    }
                },
                _ => {}
            }
        }
        if self.img.is_some() {
            eprintln!("{PROG}: file open already, try 'help close'");
            return false;
        }
        if pos.len() > 1 {
            println!("{}", cmd.usage);
            return false;
        }
        let has = |f: char| opts.iter().any(|(c, _)| *c == f);
        // -r sets the default of `read-only`; `-o read-only=...` overrides it.
        let mut o = cache
            .apply(crate::common::open_options())
            .read_only(has('r'));
        for (c, v) in &opts {
            if let ('o', Some(s)) = (c, v) {
                if let Err(e) = o.apply_qemu_str(s) {
                    let dev = pos.first().copied();
                    match dev {
                        Some(d) => eprintln!("{PROG}: can't open device {d}: {e}"),
                        None => eprintln!("{PROG}: can't open: {e}"),
                    }
                    return false;
                }
            }
        }
        if let Err(m) = check_read_only(&o, has('r')) {
            match pos.first() {
                Some(d) => eprintln!("{PROG}: can't open device {d}: {m}"),
                None => eprintln!("{PROG}: can't open: {m}"),
            }
            return false;
        }
        let share = has('U') || o.get_force_share();
        let mut o = o.force_share(share);
        if let Some(p) = pos.first() {
            o = o.with_filename(PathBuf::from(p));
        }
        match self.open(pos.first().copied(), o) {
            Ok(()) => {
                self.writethrough = cache.writethrough;
                true
            }
            Err(m) => {
                eprintln!("{PROG}: {m}");
                false
            }
        }
    }
}

/// qemu-io's `sleep MS`: C `strtol` (base 0) must consume the whole
/// argument and give a non-negative number, else `X is not a valid number`
/// (stdout). Prints nothing on success.
fn sleep(arg: &str) -> Done {
    match parse_strtol_ms(arg) {
        Some(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            true
        }
        None => {
            println!("{arg} is not a valid number");
            false
        }
    }
}

impl State {
    /// In write-through mode, flushes after a request (QEMU's FUA
    /// emulation): a failed flush fails the request.
    fn write_through(&self) -> Result<(), String> {
        match (&self.img, self.writethrough) {
            (Some(img), true) => img.flush().map_err(|e| e.errno_text()),
            _ => Ok(()),
        }
    }
}

/// `strtol(s, &end, 0)` with `*end == '\0'` and a result `>= 0`: optional
/// leading white space and sign, `0x` hex, `0` octal, decimal. Overflow
/// saturates, as `strtol` does. The empty string is 0.
fn parse_strtol_ms(s: &str) -> Option<u64> {
    let t = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (neg, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if h.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            (16, h)
        } else {
            // strtol parses the "0" and stops at the "x".
            return (s.is_empty() || t.len() == 1).then_some(0);
        }
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        // No digits at all: strtol returns 0 with end = s (valid only if s is "").
        return s.is_empty().then_some(0);
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = u64::from_str_radix(digits, radix).unwrap_or(i64::MAX as u64);
    let v = v.min(i64::MAX as u64);
    if neg && v != 0 {
        return None;
    }
    Some(v)
}

/// Closes the image, reporting a failure as qemu-io does (its qcow2 driver
/// prints why each cache could not be written back). A handle disabled by
/// a corruption event was already reported by the event.
fn report_close(img: Image) {
    match img.close() {
        Ok(()) | Err(Error::MediumGone) => {}
        Err(Error::OverlapPrevented { .. } | Error::Corrupt { .. }) => {}
        Err(e) => {
            let text = e.errno_text();
            eprintln!("{PROG}: Failed to flush the L2 table cache: {text}");
            eprintln!("{PROG}: Failed to flush the refcount block cache: {text}");
        }
    }
}

/// qemu-io's cache settings (`-t MODE`, `-n`), as QEMU's
/// `bdrv_parse_cache_mode` sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheMode {
    /// `O_DIRECT` (`cache.direct=on`).
    direct: bool,
    /// Flushes do nothing (`cache.no-flush=on`).
    no_flush: bool,
    /// Flush after every write (the block backend's write cache is off).
    pub(crate) writethrough: bool,
}

impl CacheMode {
    /// qemu-io's default: `writethrough`.
    const DEFAULT: CacheMode = CacheMode {
        direct: false,
        no_flush: false,
        writethrough: true,
    };

    /// `none`/`off`, `directsync`, `writeback`, `unsafe`, `writethrough`.
    pub(crate) fn parse(mode: &str) -> Option<CacheMode> {
        let (direct, no_flush, writethrough) = match mode {
            "none" | "off" => (true, false, false),
            "directsync" => (true, false, true),
            "writeback" => (false, false, false),
            "unsafe" => (false, true, false),
            "writethrough" => (false, false, true),
            _ => return None,
        };
        Some(CacheMode {
            direct,
            no_flush,
            writethrough,
        })
    }

    /// `-n`: `O_DIRECT`, write-back (the other flags stay).
    fn nocache(self) -> CacheMode {
        CacheMode {
            direct: true,
            writethrough: false,
            ..self
        }
    }

    /// The mode of the command line: `-t` resets what an earlier `-n` set,
    /// a later `-n` applies on top of `-t`.
    fn from_args(argv: &[String], mode: Option<&str>, nocache: bool) -> Result<CacheMode, String> {
        let base = match mode {
            Some(m) => CacheMode::parse(m).ok_or_else(|| format!("Invalid cache option: {m}"))?,
            None => CacheMode::DEFAULT,
        };
        if !nocache {
            return Ok(base);
        }
        let (n_at, t_at) = cache_option_positions(argv);
        Ok(if mode.is_some() && t_at > n_at {
            base
        } else {
            base.nocache()
        })
    }

    /// Whether the files are opened with `O_DIRECT`.
    pub(crate) fn direct(self) -> bool {
        self.direct
    }

    /// Whether flushes do nothing.
    pub(crate) fn no_flush(self) -> bool {
        self.no_flush
    }

    pub(crate) fn apply(self, o: OpenOptions) -> OpenOptions {
        o.cache_direct(self.direct).cache_no_flush(self.no_flush)
    }
}

/// Where the last `-n`/`--nocache` and the last `-t`/`--cache` are in the
/// command line (getopt order), as indices into `argv`.
fn cache_option_positions(argv: &[String]) -> (Option<usize>, Option<usize>) {
    let takes_arg = |c: char| matches!(c, 'f' | 'c' | 't' | 'd');
    let (mut n_at, mut t_at) = (None, None);
    let mut i = 0;
    while i < argv.len() {
        let a = argv[i].as_str();
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, _)) => (n, true),
                None => (long, false),
            };
            match name {
                "nocache" => n_at = Some(i),
                "cache" => t_at = Some(i),
                _ => {}
            }
            if !inline && matches!(name, "cache" | "format" | "cmd" | "discard") {
                i += 1;
            }
        } else if let Some(flags) = a.strip_prefix('-') {
            for (k, c) in flags.char_indices() {
                match c {
                    'n' => n_at = Some(i),
                    't' => t_at = Some(i),
                    _ => {}
                }
                if takes_arg(c) {
                    if k + c.len_utf8() == flags.len() {
                        i += 1;
                    }
                    break;
                }
            }
        }
        i += 1;
    }
    (n_at, t_at)
}

/// A small getopt (glibc style: options may follow operands). Returns the
/// options with their arguments and the operands; on an error prints
/// getopt's message (stderr) and the command's usage (stdout).
#[allow(clippy::type_complexity)]
fn getopt<'a>(
    cmd: &Cmd,
    args: &[&'a str],
    spec: &str,
) -> Option<(Vec<(char, Option<&'a str>)>, Vec<&'a str>)> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    let takes_arg = |c: char| -> Option<bool> {
        let idx = spec.find(c)?;
        Some(spec[idx + c.len_utf8()..].starts_with(':'))
    };
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            pos.extend_from_slice(&args[i..]);
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            pos.push(a);
            continue;
        }
        let chars: Vec<(usize, char)> = a.char_indices().skip(1).collect();
        let mut k = 0;
        while k < chars.len() {
            let (idx, c) = chars[k];
            match takes_arg(c) {
                None => {
                    eprintln!("{}: invalid option -- '{c}'", cmd.name);
                    println!("{}", cmd.usage);
                    return None;
                }
                Some(false) => opts.push((c, None)),
                Some(true) => {
                    let rest = &a[idx + c.len_utf8()..];
                    if !rest.is_empty() {
                        opts.push((c, Some(rest)));
                    } else if i < args.len() {
                        opts.push((c, Some(args[i])));
                        i += 1;
                    } else {
                        eprintln!("{}: option requires an argument -- '{c}'", cmd.name);
                        println!("{}", cmd.usage);
                        return None;
                    }
                    break;
                }
            }
            k += 1;
        }
    }
    Some((opts, pos))
}

/// qemu-io's `cvtnum`: a size with suffix, at most `i64::MAX`; prints the
/// parse error (stdout) on failure.
fn cvtnum(s: &str) -> Option<u64> {
    let r = parse_size(s).and_then(|v| {
        if v > i64::MAX as u64 {
            Err(SizeError::OutOfRange {
                input: s.to_owned(),
            })
        } else {
            Ok(v)
        }
    });
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            println!("{}", e.qemu_io_message());
            None
        }
    }
}

/// Offset and length of a request, parsed in order (the length is not
/// looked at when the offset is invalid, as in qemu-io).
fn two_nums(offset: &str, len: &str) -> Option<(u64, u64)> {
    let o = cvtnum(offset)?;
    let l = cvtnum(len)?;
    Some((o, l))
}

/// qemu-io's `parse_pattern` (C `strtol` base 0, 0..=255); prints the error.
fn parse_pattern(s: &str) -> Option<u8> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()
    } else {
        body.parse::<i64>().ok()
    };
    match v.map(|v| if neg { -v } else { v }) {
        Some(v) if (0..=255).contains(&v) => u8::try_from(v).ok(),
        _ => {
            println!("{s} is not a valid pattern byte");
            None
        }
    }
}

/// qemu-io's `dump_buffer`: 16 bytes a line, `isalnum` characters shown.
fn dump_buffer(buf: &[u8], offset: u64) {
    for (i, chunk) in buf.chunks(16).enumerate() {
        let mut line = format!("{:08x}:  ", offset + (i as u64) * 16);
        for b in chunk {
            line.push_str(&format!("{b:02x} "));
        }
        line.push(' ');
        for b in chunk {
            line.push(if b.is_ascii_alphanumeric() {
                *b as char
            } else {
                '.'
            });
        }
        println!("{line}");
    }
}

/// qemu-io's `cvtstr`: `64 KiB`, `1.500 KiB`, `48 bytes`.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (num, suffix) = UNITS
        .iter()
        .find(|(u, _)| value >= *u)
        .map(|(u, s)| (format!("{:.3}", value / u), *s))
        .unwrap_or_else(|| (format!("{value:.6}"), " bytes"));
    match num.find(".000") {
        Some(p) => format!("{}{suffix}", &num[..p]),
        None => format!("{num}{suffix}"),
    }
}

/// qemu-io's `timestr`: `SS.ss sec` under a second, else `H:MM:SS.ss`.
fn timestr(t: Duration, verbose: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if verbose || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs / 60) % 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

/// qemu-io's `print_report` for one request.
fn print_report(op: &str, t: Duration, offset: u64, count: u64, total: u64, cflag: bool) {
    let secs = t.as_secs_f64();
    let rate = total as f64 / secs;
    let ops = 1.0 / secs;
    if cflag {
        println!("{total},1,{},{rate:.3},{ops:.3}", timestr(t, true));
    } else {
        println!("{op} {total}/{count} bytes at offset {offset}");
        println!(
            "{}, 1 ops; {} ({}/sec and {ops:.4} ops/sec)",
            cvtstr(total as f64),
            timestr(t, false),
            cvtstr(rate)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_like_qemu() {
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(48.0), "48 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(786432.0), "768 KiB");
    }

    #[test]
    fn sleep_argument_like_strtol() {
        assert_eq!(parse_strtol_ms("3000"), Some(3000));
        assert_eq!(parse_strtol_ms("0x10"), Some(16));
        assert_eq!(parse_strtol_ms("010"), Some(8));
        assert_eq!(parse_strtol_ms("0"), Some(0));
        assert_eq!(parse_strtol_ms("+5"), Some(5));
        assert_eq!(parse_strtol_ms("-0"), Some(0));
        assert_eq!(parse_strtol_ms("1.5"), None);
        assert_eq!(parse_strtol_ms("x"), None);
        assert_eq!(parse_strtol_ms("-1"), None);
        assert_eq!(parse_strtol_ms("08"), None);
        assert_eq!(parse_strtol_ms("0x"), None);
        assert_eq!(
            parse_strtol_ms("99999999999999999999"),
            Some(i64::MAX as u64)
        );
    }

    #[test]
    fn cache_modes_like_qemu_io() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mode = |v: &[&str], t: Option<&str>, n: bool| CacheMode::from_args(&args(v), t, n);
        let m = |direct, no_flush, writethrough| CacheMode {
            direct,
            no_flush,
            writethrough,
        };
        assert_eq!(mode(&[], None, false), Ok(m(false, false, true)));
        assert_eq!(mode(&["-n"], None, true), Ok(m(true, false, false)));
        assert_eq!(
            mode(&["-t", "directsync"], Some("directsync"), false),
            Ok(m(true, false, true))
        );
        assert_eq!(
            mode(&["-tnone"], Some("none"), false),
            Ok(m(true, false, false))
        );
        assert_eq!(
            mode(&["-t", "off"], Some("off"), false),
            Ok(m(true, false, false))
        );
        assert_eq!(
            mode(&["-t", "unsafe"], Some("unsafe"), false),
            Ok(m(false, true, false))
        );
        // -t resets an earlier -n; a later -n applies on top of -t.
        assert_eq!(
            mode(&["-n", "-t", "writeback"], Some("writeback"), true),
            Ok(m(false, false, false))
        );
        assert_eq!(
            mode(&["-t", "unsafe", "-rn"], Some("unsafe"), true),
            Ok(m(true, true, false))
        );
        // `-c 'write -n …'` is a command, not the option.
        assert_eq!(
            mode(
                &["-n", "-c", "-t", "-t", "writethrough"],
                Some("writethrough"),
                true
            ),
            Ok(m(false, false, true))
        );
        assert_eq!(
            mode(&["-t", "bogus"], Some("bogus"), false),
            Err("Invalid cache option: bogus".to_string())
        );
    }

    #[test]
    fn timestr_like_qemu() {
        assert_eq!(timestr(Duration::from_millis(5), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
    }
}
