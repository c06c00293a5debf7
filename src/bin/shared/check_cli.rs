//! The `qemu-img check` command line, shared by `qcow2-check` and
//! `qcow2-img check`: option parsing with qemu-img's messages, output on
//! stdout/stderr exactly as `qemu-img check` prints it, and its exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format
//! without checks). `qcow2-check` differs in one point: without `-f` it
//! takes the file as qcow2 rather than probing it, so a raw file is "not in
//! qcow2 format" (exit 1) and 63 needs an explicit `-f raw`.
//!
//! `qcow2-img` calls [`run_check_cli`] with [`CliName::QCOW2_IMG_CHECK`] and
//! the arguments after `check`. Both binaries include this file (with
//! `#[path]`), so the library itself knows nothing of the command line.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Command};
use qcow2kit::check::{CheckEvent, CheckOptions, Checker, Repair};
use qcow2kit::error::{Error, IoOp};
use qcow2kit::storage::{FileStorage, Storage};
use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

/// How the command names itself in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CliName {
    /// The program, prefixed to error messages (`qcow2-check: ...`).
    pub program: &'static str,
    /// The subcommand, if the program has several (`check`).
    pub command: Option<&'static str>,
}

impl CliName {
    /// The standalone `qcow2-check` binary.
    #[allow(
        dead_code,
        reason = "each binary that includes this file uses one name"
    )]
    pub const QCOW2_CHECK: CliName = CliName {
        program: "qcow2-check",
        command: None,
    };
    /// `qcow2-img check`.
    #[allow(
        dead_code,
        reason = "each binary that includes this file uses one name"
    )]
    pub const QCOW2_IMG_CHECK: CliName = CliName {
        program: "qcow2-img",
        command: Some("check"),
    };

    /// `program` or `program command`.
    fn full(self) -> String {
        match self.command {
            Some(c) => format!("{} {c}", self.program),
            None => self.program.to_string(),
        }
    }
}

/// Images at least this large get a progress bar (when stderr is a terminal).
const PROGRESS_MIN_BYTES: u64 = 1 << 30;

/// The qcow2 magic, "QFI\xfb" (probing the format of `qcow2-img check`'s FILE).
const QCOW2_MAGIC: u32 = 0x5146_49fb;

/// Steps of the progress bar (0 to 100% in hundredths of a percent).
const BAR_STEPS: u64 = 10_000;

/// One progress model over every phase of a check, so the bar only moves
/// forward from 0 to 100%: each pass is a share of the whole (all of it for
/// a check; half of it for each of the two passes a repair may run), and
/// inside a pass each phase of [`qcow2kit::check::PHASES`] a share by
/// weight. A phase that runs again (the walk after a refcount rebuild) or
/// counts that go backwards never move the bar back.
#[derive(Debug, Clone)]
struct CheckProgress {
    /// Where the current pass starts, in [`BAR_STEPS`].
    pass_start: u64,
    /// How many steps the current pass spans.
    pass_span: u64,
    /// The position shown last.
    shown: u64,
}

/// Relative cost of the phases of a pass, in the order of
/// [`qcow2kit::check::PHASES`]: the walk reads every table, the comparison
/// every refcount block, the COPIED check the active L2 tables again.
const PHASE_WEIGHTS: [u64; 3] = [6, 3, 1];

impl CheckProgress {
    /// The model for a run that may (`repairing`) or will not repair.
    fn new(repairing: bool) -> CheckProgress {
        let pass_span = if repairing { BAR_STEPS / 2 } else { BAR_STEPS };
        CheckProgress {
            pass_start: 0,
            pass_span,
            shown: 0,
        }
    }

    /// Position after `done` of `total` units of `phase`.
    fn phase(&mut self, phase: &str, done: u64, total: u64) -> u64 {
        let Some(i) = qcow2kit::check::PHASES.iter().position(|p| *p == phase) else {
            return self.shown;
        };
        let weights = u128::from(PHASE_WEIGHTS.iter().sum::<u64>());
        let before = u128::from(PHASE_WEIGHTS.iter().take(i).sum::<u64>());
        let w = u128::from(PHASE_WEIGHTS.get(i).copied().unwrap_or(0));
        // The pass's share times (weights before + w * done/total) / weights.
        let total = u128::from(total.max(1));
        let done = u128::from(done).min(total);
        let in_pass = u128::from(self.pass_span) * (before * total + w * done) / (weights * total);
        let pos = self.pass_start + u64::try_from(in_pass).unwrap_or(self.pass_span);
        self.advance(pos)
    }

    /// The repair fixed something: the double check takes the rest.
    fn second_pass(&mut self) -> u64 {
        self.pass_start = self.shown.clamp(BAR_STEPS / 2, BAR_STEPS);
        self.pass_span = BAR_STEPS - self.pass_start;
        self.advance(self.pass_start)
    }

    /// The run is over.
    fn finish(&mut self) -> u64 {
        self.advance(BAR_STEPS)
    }

    fn advance(&mut self, pos: u64) -> u64 {
        self.shown = self.shown.max(pos.min(BAR_STEPS));
        self.shown
    }
}

/// Exit code when the format does not support checks.
const EXIT_UNSUPPORTED: i32 = 63;

/// The `--help` text: synopsis, each option, the exit codes.
fn help_text(name: CliName) -> String {
    let full = name.full();
    let pad = " ".repeat(full.len() + 8);
    let (format_default, version) = match name.command {
        // qcow2-check takes the file as qcow2 unless told otherwise.
        None => (
            "default qcow2, so a file that is not qcow2 is an\n      \
             error (exit 1); -f raw gives exit 63, raw images having no checks",
            "  -V, --version\n      print the version and exit (as the first argument)\n",
        ),
        Some(_) => (
            "default: probed from the file; a raw file, or\n      \
             -f raw, gives exit 63, raw images having no checks",
            "",
        ),
    };
    format!(
        "\
Usage: {full} [-f qcow2|raw | --image-opts] [-r leaks|all] [--output human|json]
{pad}[-q] [-T CACHE_MODE] [-U] [--object OBJECTDEF] FILE

Check a qcow2 image for consistency and optionally repair it. Without -r the
image is opened read-only; with -r read-write.

Options:
  -h, --help
      print this help and exit
{version}  -f, --format qcow2|raw
      format of FILE; {format_default}
  -r, --repair leaks|all
      repair leaked clusters only, or all errors (opens FILE read-write;
      incompatible with -U)
  --output human|json
      output format (default human)
  -q, --quiet
      print nothing on stdout (errors still go to stderr)
  -T, --cache CACHE_MODE
      cache mode: none, off, writeback, unsafe, directsync or writethrough;
      checked, otherwise accepted for compatibility
  -U, --force-share
      open FILE in shared mode, so an image another process holds can be
      checked (no lock conflict; read-only checks only)
  --image-opts
      FILE is an option string naming the image and its runtime options,
      driver=qcow2,file.filename=PATH[,...] (driver=raw gives exit 63);
      incompatible with -f
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64],
      that encrypt.key-secret=ID in the --image-opts string names (the key
      of an encrypted image); may be repeated
  Long options may be abbreviated (--rep for --repair).

Arguments:
  FILE
      the image file (with --image-opts: its option string); exactly one

Exit codes:
  0   check done, the image is consistent (or was made so by -r)
  1   check not done: bad argument, FILE cannot be opened, not a qcow2 image,
      or the repair failed
  2   check done, corruptions remain (they take precedence over leaks)
  3   check done, only leaked clusters remain
  63  the format has no checks (-f raw)
"
    )
}

fn command(name: CliName) -> Command {
    Command::new(name.program)
        .bin_name(name.full())
        .override_help(help_text(name))
        .disable_version_flag(true)
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("FMT")
                .action(ArgAction::Append)
                .help("image format (default: probed)"),
        )
        .arg(
            Arg::new("repair")
                .short('r')
                .long("repair")
                .value_name("leaks|all")
                .action(ArgAction::Append)
                .help("repair leaks, or all errors (opens the image read-write)"),
        )
        .arg(
            Arg::new("output")
                .long("output")
                .value_name("human|json")
                .action(ArgAction::Append)
                .help("output format (default: human)"),
        )
        .arg(
            Arg::new("quiet")
                .short('q')
                .long("quiet")
                .action(ArgAction::SetTrue)
                .help("print nothing on stdout"),
        )
        .arg(
            Arg::new("force-share")
                .short('U')
                .long("force-share")
                .action(ArgAction::SetTrue)
                .help("open the image in shared mode (read-only checks only)"),
        )
        .arg(
            Arg::new("cache")
                .short('T')
                .long("cache")
                .value_name("CACHE_MODE")
                .action(ArgAction::Append)
                .help("cache mode (accepted for compatibility)"),
        )
        .arg(
            Arg::new("image-opts")
                .long("image-opts")
                .action(ArgAction::SetTrue)
                .help("FILE is an option string (driver=qcow2,file.filename=...)"),
        )
        .arg(
            Arg::new("object")
                .long("object")
                .value_name("OBJECTDEF")
                .action(ArgAction::Append)
                .help("a secret: secret,id=ID,data=STRING|file=PATH[,format=raw|base64]"),
        )
        .arg(
            Arg::new("file")
                .value_name("FILE")
                .action(ArgAction::Append)
                .num_args(0..),
        )
}

/// Output streams, so tests can capture them.
struct Out<'a> {
    stdout: &'a mut dyn Write,
    stderr: &'a mut dyn Write,
}

/// Runs `qemu-img check` semantics over `args` (the arguments after the
/// program or subcommand name) and returns the exit code, printing to the
/// process's stdout and stderr.
pub fn run_check_cli<I, S>(name: CliName, args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let progress = stderr.is_terminal();
    let mut so = stdout.lock();
    let mut se = stderr.lock();
    run_check_cli_with(name, args, &mut so, &mut se, progress)
}

/// [`run_check_cli`] writing to the given streams; `progress` allows a
/// progress bar on the process's stderr for large images.
pub fn run_check_cli_with<I, S>(
    name: CliName,
    args: I,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
    progress: bool,
) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let mut out = Out { stdout, stderr };
    let code = run(name, args, &mut out, progress);
    let _ = out.stdout.flush();
    let _ = out.stderr.flush();
    code
}

/// Prints a usage error the way qemu-img's `error_exit` does.
fn usage_error(name: CliName, out: &mut Out<'_>, msg: &str) -> i32 {
    let _ = writeln!(out.stderr, "{}: {msg}", name.program);
    let _ = writeln!(out.stderr, "Try '{} --help' for more info", name.full());
    1
}

/// Maps a clap error to getopt's message; `argv` are the raw arguments.
fn getopt_error(name: CliName, out: &mut Out<'_>, e: &clap::Error, argv: &[String]) -> i32 {
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    let msg = match e.kind() {
        ErrorKind::UnknownArgument if invalid.starts_with("--") => {
            // getopt shows the argument as typed, `=value` included.
            let typed = argv
                .iter()
                .find(|a| a.starts_with(&invalid))
                .cloned()
                .unwrap_or(invalid);
            format!("unrecognized option '{typed}'")
        }
        ErrorKind::UnknownArgument => {
            let c = invalid
                .trim_start_matches('-')
                .chars()
                .next()
                .unwrap_or('?');
            format!("invalid option -- '{c}'")
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals => {
            // A missing value: the option is the last argument.
            let last = argv.last().map(String::as_str).unwrap_or("");
            if let Some(long) = last.strip_prefix("--") {
                format!("option '--{long}' requires an argument")
            } else {
                let c = last.chars().last().unwrap_or('?');
                format!("option requires an argument -- '{c}'")
            }
        }
        _ => e.to_string().trim().to_string(),
    };
    let _ = writeln!(out.stderr, "{}: {msg}", name.full());
    let _ = writeln!(out.stderr, "Try '{} --help' for more info", name.full());
    1
}

/// qemu-img's long options (getopt order) and whether they take a value.
const LONG_OPTIONS: [(&str, bool); 9] = [
    ("help", false),
    ("format", true),
    ("image-opts", false),
    ("cache", true),
    ("repair", true),
    ("force-share", false),
    ("output", true),
    ("quiet", false),
    ("object", true),
];

/// Expands unambiguous abbreviations of long options as getopt does
/// (`--rep` for `--repair`); an ambiguous one is getopt's error.
fn expand_long_options(args: &[String]) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            out.extend(args[i - 1..].iter().cloned());
            break;
        }
        let Some(body) = a.strip_prefix("--") else {
            out.push(a.clone());
            continue;
        };
        let (opt, value) = match body.split_once('=') {
            Some((o, v)) => (o, Some(v)),
            None => (body, None),
        };
        let exact = LONG_OPTIONS.iter().find(|(n, _)| *n == opt);
        let matches: Vec<&(&str, bool)> = match exact {
            Some(e) => vec![e],
            None => LONG_OPTIONS
                .iter()
                .filter(|(n, _)| n.starts_with(opt))
                .collect(),
        };
        match matches.as_slice() {
            [(full, false)] if value.is_some() => {
                return Err(format!("option '--{full}' doesn't allow an argument"));
            }
            [(full, takes_value)] => {
                out.push(match value {
                    Some(v) => format!("--{full}={v}"),
                    None => format!("--{full}"),
                });
                if *takes_value && value.is_none() && i < args.len() {
                    out.push(args[i].clone());
                    i += 1;
                }
            }
            [] => out.push(a.clone()),
            many => {
                let list: Vec<String> = many.iter().map(|(n, _)| format!("'--{n}'")).collect();
                return Err(format!(
                    "option '--{opt}' is ambiguous; possibilities: {}",
                    list.join(" ")
                ));
            }
        }
    }
    Ok(out)
}

/// The value given last for an option, with its position.
fn last_value(m: &clap::ArgMatches, id: &str) -> Option<(usize, String)> {
    let vals: Vec<String> = m.get_many::<String>(id)?.cloned().collect();
    let idx: Vec<usize> = m.indices_of(id)?.collect();
    Some((*idx.last()?, vals.last()?.clone()))
}

fn run<I, S>(name: CliName, args: I, out: &mut Out<'_>, progress: bool) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let raw: Vec<String> = args
        .into_iter()
        .map(|a| a.into().to_string_lossy().into_owned())
        .collect();
    let raw = match expand_long_options(&raw) {
        Ok(r) => r,
        Err(msg) => {
            let _ = writeln!(out.stderr, "{}: {msg}", name.full());
            let _ = writeln!(out.stderr, "Try '{} --help' for more info", name.full());
            return 1;
        }
    };
    let argv = std::iter::once(name.full()).chain(raw.iter().cloned());
    let m = match command(name).try_get_matches_from(argv) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::DisplayHelp => {
            let _ = write!(out.stdout, "{}", e.render());
            return 0;
        }
        Err(e) => return getopt_error(name, out, &e, &raw),
    };
    // Option values are validated in command-line order, as getopt sees them.
    let mut checks: Vec<(usize, &str, String)> = Vec::new();
    for id in ["repair", "output", "cache"] {
        if let (Some(vals), Some(idx)) = (m.get_many::<String>(id), m.indices_of(id)) {
            for (v, i) in vals.zip(idx) {
                checks.push((i, id, v.clone()));
            }
        }
    }
    checks.sort_by_key(|c| c.0);
    let mut repair = Repair::None;
    let mut json = false;
    for (_, id, v) in &checks {
        match *id {
            "repair" => {
                repair = match v.as_str() {
                    "leaks" => Repair::Leaks,
                    "all" => Repair::All,
                    _ => {
                        return usage_error(
                            name,
                            out,
                            &format!("--repair (-r) expects 'leaks' or 'all' not '{v}'"),
                        )
                    }
                }
            }
            "output" => {
                json = match v.as_str() {
                    "json" => true,
                    "human" => false,
                    _ => {
                        return usage_error(
                            name,
                            out,
                            &format!("--output expects 'human' or 'json' not '{v}'"),
                        )
                    }
                }
            }
            _ => {}
        }
    }
    let files: Vec<String> = m
        .get_many::<String>("file")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    if files.len() != 1 {
        return usage_error(name, out, "Expecting one image file name");
    }
    let filename = files[0].clone();
    if let Some((_, cache)) = last_value(&m, "cache") {
        let valid = [
            "none",
            "off",
            "writeback",
            "unsafe",
            "directsync",
            "writethrough",
        ];
        if !valid.contains(&cache.as_str()) {
            let _ = writeln!(
                out.stderr,
                "{}: Invalid source cache option: {cache}",
                name.program
            );
            return 1;
        }
    }
    let quiet = m.get_flag("quiet");
    let force_share = m.get_flag("force-share");
    let mut format = last_value(&m, "format").map(|(_, f)| f);
    let image_opts = m.get_flag("image-opts");
    // `--object secret,...`: the secrets `encrypt.key-secret` may name,
    // defined before anything is opened (QEMU's order).
    let mut secrets = qcow2kit::crypto::SecretStore::new();
    for spec in m.get_many::<String>("object").into_iter().flatten() {
        if let Err(e) = secrets.add_object(spec) {
            let _ = writeln!(out.stderr, "{}: {e}", name.program);
            return 1;
        }
    }
    let could_not_open = |out: &mut Out<'_>, msg: &str| {
        let _ = writeln!(
            out.stderr,
            "{}: Could not open '{filename}': {msg}",
            name.program
        );
        1
    };
    if force_share && repair != Repair::None {
        return could_not_open(out, "force-share=on can only be used with read-only images");
    }
    if let Some(f) = format.as_deref() {
        if f != "qcow2" && f != "raw" {
            return could_not_open(out, &format!("Unknown driver '{f}'"));
        }
    }
    // With --image-opts FILE is an option string (`driver=qcow2,
    // file.filename=disk.qcow2,...`) naming the image file.
    let mut open_opts = qcow2kit::options::OpenOptions::new().secrets(secrets.clone());
    let image_file = if image_opts {
        if format.is_some() {
            let _ = writeln!(
                out.stderr,
                "{}: --image-opts and --format are mutually exclusive",
                name.program
            );
            return 1;
        }
        let pairs = match qcow2kit::cli_support::split_option_string(&filename) {
            Ok(p) => p,
            Err(e) => return could_not_open(out, &e.to_string()),
        };
        let value_of = |key: &str| {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        // `file=NAME` (also a leading bare NAME, qemu-img's implied key)
        // names a block node, and there are none to refer to.
        let implied = filename
            .split(',')
            .next()
            .filter(|h| !h.is_empty() && !h.contains('='))
            .map(str::to_owned);
        if let Some(node) = implied.or_else(|| value_of("file")) {
            return could_not_open(
                out,
                &format!("Cannot find device='{node}' nor node-name='{node}'"),
            );
        }
        let file = if value_of("driver").as_deref() == Some("raw") {
            // Raw images have no checks: only the file matters.
            format = Some("raw".into());
            value_of("file.filename")
        } else {
            if value_of("driver").is_some() {
                format = Some("qcow2".into());
            }
            match qcow2kit::options::OpenOptions::from_qemu_str(&filename) {
                Ok(o) => open_opts = o.secrets(secrets.clone()),
                Err(e) => return could_not_open(out, &e.to_string()),
            }
            open_opts.filename().map(|p| p.display().to_string())
        };
        match file {
            Some(f) => f,
            None => return could_not_open(out, "A block device must be specified for \"file\""),
        }
    } else {
        filename.clone()
    };
    let path = Path::new(&image_file);
    // QEMU's file driver takes regular files only (character and block
    // devices go to its host_device driver); it refuses anything else after
    // opening it. A FIFO is refused before opening, where QEMU would block.
    let not_regular = || format!("'file' driver requires '{image_file}' to be a regular file");
    let file_type = |p: &Path| std::fs::metadata(p).ok().map(|m| m.file_type());
    if file_type(path).is_some_and(|t| t.is_fifo()) {
        return could_not_open(out, &not_regular());
    }
    // An NBD URI is opened with the nbd client, as QEMU takes one for a file name.
    let nbd = ["nbd://", "nbd+unix://", "nbd+tcp://"]
        .iter()
        .any(|p| image_file.starts_with(p));
    let file: Arc<dyn Storage> = if nbd {
        let spec = qcow2kit::storage::BackendSpec {
            driver: "nbd".into(),
            options: vec![(
                "filename".into(),
                image_file.replace("nbd+tcp://", "nbd://"),
            )],
        };
        match qcow2kit::storage::open_from_options(&spec, repair == Repair::None) {
            Ok(s) => s,
            Err(m) => return could_not_open(out, &m),
        }
    } else {
        match FileStorage::open(path, repair != Repair::None) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                let text = qcow2kit::error::strerror(e.raw_os_error().unwrap_or(libc::EIO));
                return could_not_open(out, &format!("Could not open '{image_file}': {text}"));
            }
        }
    };
    if file_type(path).is_some_and(|t| !(t.is_file() || t.is_char_device() || t.is_block_device()))
    {
        return could_not_open(out, &not_regular());
    }
    let is_qcow2 = match format.as_deref() {
        Some("raw") => false,
        Some(_) => true,
        // `qcow2-check` checks qcow2 only: an unnamed format is qcow2, and
        // anything else is "not in qcow2 format" (exit 1). `qcow2-img check`
        // probes as `qemu-img check` does.
        None if name.command.is_none() => true,
        None => {
            let mut magic = [0u8; 4];
            let ok =
                file.len().map(|l| l >= 4).unwrap_or(false) && file.read_at(&mut magic, 0).is_ok();
            ok && u32::from_be_bytes(magic) == QCOW2_MAGIC
        }
    };
    if !is_qcow2 {
        if format.is_none() && repair != Repair::None {
            // QEMU's raw driver warns on a probed read-write open.
            let _ = writeln!(
                out.stderr,
                "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         \
                 Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                 Specify the 'raw' format explicitly to remove the restrictions."
            );
        }
        let _ = writeln!(
            out.stderr,
            "{}: This image format does not support checks",
            name.program
        );
        return EXIT_UNSUPPORTED;
    }
    let file_len = file.len().unwrap_or(0);
    let share = force_share || open_opts.get_force_share();
    let open_opts = open_opts.force_share(share);
    let named = (!nbd).then_some(path);
    let checker = match Checker::open_storage_with(file.clone(), named, repair, &open_opts) {
        Ok(c) => c,
        Err(e) => {
            // QEMU warns about stale bitmaps while reading the header,
            // before whatever makes the open fail.
            let mut head = vec![0u8; file_len.min(2 << 20) as usize];
            if file.read_at(&mut head, 0).is_ok() {
                if let Ok(h) = qcow2kit::format::header::Header::decode_for_check(&head) {
                    for f in qcow2kit::check::stale_bitmaps_findings(&h) {
                        let _ = writeln!(out.stderr, "{}", cli_line(name, &f));
                    }
                }
            }
            return could_not_open(out, &open_message(&e));
        }
    };

    // Findings go to stderr as they come; the repaired paragraph to stdout.
    let bar = (progress && !quiet && file_len >= PROGRESS_MIN_BYTES).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(BAR_STEPS),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg:24} [{bar:40}] {percent:>3}%")
        {
            b.set_style(style.progress_chars("=> "));
        }
        b
    });
    let mut model = CheckProgress::new(repair != Repair::None);
    let mut paragraph: Option<String> = None;
    let report = {
        let stderr = &mut *out.stderr;
        let bar_ref = bar.as_ref();
        let paragraph_ref = &mut paragraph;
        let model_ref = &mut model;
        let on_event = move |ev: CheckEvent<'_>| match ev {
            CheckEvent::Finding(f) => {
                let line = cli_line(name, f);
                match bar_ref {
                    Some(b) => b.suspend(|| {
                        let _ = writeln!(stderr, "{line}");
                    }),
                    None => {
                        let _ = writeln!(stderr, "{line}");
                    }
                }
            }
            CheckEvent::Repaired {
                leaks_fixed,
                corruptions_fixed,
            } => {
                *paragraph_ref = Some(qcow2kit::check::CheckReport::repaired_paragraph(
                    leaks_fixed,
                    corruptions_fixed,
                ));
                let pos = model_ref.second_pass();
                if let Some(b) = bar_ref {
                    b.set_position(pos);
                }
            }
            CheckEvent::Progress { phase, done, total } => {
                let pos = model_ref.phase(phase, done, total);
                if let Some(b) = bar_ref {
                    b.set_message(phase);
                    b.set_position(pos);
                }
            }
            _ => {}
        };
        checker.run(CheckOptions {
            on_event: Some(Box::new(on_event)),
            filename: Some(filename.clone()),
        })
    };
    if let Some(b) = &bar {
        b.set_position(model.finish());
        b.finish_and_clear();
    }
    if let Some(p) = &paragraph {
        if !json && !quiet {
            let _ = write!(out.stdout, "{p}");
        }
    }
    let code = match report {
        Ok(report) => {
            if !quiet {
                if json {
                    let _ = writeln!(out.stdout, "{}", report.to_json());
                } else {
                    let _ = write!(out.stdout, "{}", report.human_summary());
                }
            }
            if report.counts.check_errors != 0 {
                let _ = writeln!(out.stderr, "{}: Check failed", name.program);
                1
            } else {
                report.exit_code()
            }
        }
        Err(e) => {
            let _ = writeln!(
                out.stderr,
                "{}: Check failed: {}",
                name.program,
                e.errno_text()
            );
            1
        }
    };
    // A repair that could not finish leaves its writes in the caches: the
    // close writes them back. A failure is reported as qemu-img's qcow2
    // driver reports it; as there, the exit code stays the check's.
    if let Err(e) = checker.close() {
        if !matches!(e, Error::MediumGone | Error::PreviousIoFailed) {
            let text = e.errno_text();
            for cache in ["L2 table", "refcount block"] {
                let _ = writeln!(
                    out.stderr,
                    "{}: Failed to flush the {cache} cache: {text}",
                    name.program
                );
            }
        }
    }
    code
}

/// A finding as the command prints it on stderr.
fn cli_line(name: CliName, f: &qcow2kit::check::Finding) -> String {
    if f.is_error_report() {
        format!("{}: {f}", name.program)
    } else {
        f.to_string()
    }
}

/// The text after "Could not open 'FILE': " for an open failure.
fn open_message(e: &Error) -> String {
    // The caller names the file; see through a path-based open's wrapper.
    match e.inner() {
        Error::Io {
            op: IoOp::Read,
            source,
            ..
        } => format!(
            "Could not read image header: {}",
            qcow2kit::error::strerror(source.raw_os_error().unwrap_or(libc::EIO))
        ),
        other => other.qemu_message(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2kit::check::PHASES;

    /// Feeds `events` (phase index, done, total; `None` for the repair's
    /// second pass) and asserts the bar never moves back and ends at 100%.
    fn assert_monotonic(repairing: bool, events: &[Option<(usize, u64, u64)>]) -> Vec<u64> {
        let mut m = CheckProgress::new(repairing);
        let mut shown = vec![0];
        for e in events {
            let pos = match *e {
                Some((i, done, total)) => m.phase(PHASES[i], done, total),
                None => m.second_pass(),
            };
            assert!(pos <= BAR_STEPS, "{pos} past the end after {e:?}");
            assert!(
                pos >= *shown.last().unwrap(),
                "moved back at {e:?}: {shown:?}"
            );
            shown.push(pos);
        }
        assert_eq!(m.finish(), BAR_STEPS);
        shown
    }

    #[test]
    fn one_pass_moves_forward_through_all_phases() {
        let mut events = Vec::new();
        for (i, total) in [(0, 10), (1, 7), (2, 10)] {
            for done in 0..=total {
                events.push(Some((i, done, total)));
            }
        }
        let shown = assert_monotonic(false, &events);
        // Each phase ends at its cumulative weight: 60%, 90%, 100%.
        assert_eq!(shown[11], 6_000);
        assert_eq!(shown[19], 9_000);
        assert_eq!(*shown.last().unwrap(), BAR_STEPS);
    }

    #[test]
    fn phases_running_again_or_odd_counts_never_move_back() {
        let events = [
            Some((0, 5, 10)),
            Some((1, 3, 4)),
            // The walk again after a rebuild, counts going down, a phase
            // with nothing to do, more done than total.
            Some((0, 1, 10)),
            Some((1, 0, 4)),
            Some((2, 0, 0)),
            Some((1, 9, 4)),
            Some((0, 10, 10)),
        ];
        assert_monotonic(false, &events);
        let mut m = CheckProgress::new(false);
        assert_eq!(m.phase("not a phase", 1, 2), 0);
    }

    #[test]
    fn repair_with_double_check_spans_both_passes() {
        let mut events: Vec<_> = (0..3).map(|i| Some((i, 1, 1))).collect();
        events.push(None);
        events.extend((0..3).map(|i| Some((i, 1, 2))));
        events.extend((0..3).map(|i| Some((i, 2, 2))));
        let shown = assert_monotonic(true, &events);
        // The first pass fills half the bar, the double check the rest.
        assert_eq!(shown[3], BAR_STEPS / 2);
        assert_eq!(*shown.last().unwrap(), BAR_STEPS);
        // A repair that found nothing to fix jumps from 50% to the end.
        assert_monotonic(true, &[Some((2, 1, 1))]);
    }

    #[test]
    fn a_real_check_reports_forward_progress() {
        use qcow2kit::check::{check_storage, CheckOptions};
        use qcow2kit::storage::MemStorage;
        let disk: Arc<dyn Storage> = Arc::new(MemStorage::new());
        qcow2kit::create::create_on(disk.clone(), &qcow2kit::CreateOptions::default(), 1 << 30)
            .unwrap();
        let mut events = Vec::new();
        let opts = CheckOptions {
            on_event: Some(Box::new(|e| {
                if let CheckEvent::Progress { phase, done, total } = e {
                    let i = PHASES.iter().position(|p| *p == phase).unwrap();
                    events.push(Some((i, done, total)));
                }
            })),
            ..Default::default()
        };
        let report = check_storage(disk, Repair::All, opts).unwrap();
        assert_eq!(report.exit_code(), 0);
        assert!(!events.is_empty());
        assert_monotonic(true, &events);
    }
}
