//! What every subcommand shares: failures and how they are printed, clap
//! errors mapped to getopt's texts, opening images with qemu-img's messages,
//! `-f`/`--output` checks.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use qcow2kit::{Error, Image, OpenOptions};

/// The program name used in every message.
pub const PROG: &str = "qcow2-img";

/// Why a subcommand stopped; [`Fail::report`] prints it the way qemu-img
/// would and gives the exit code.
#[derive(Debug)]
pub enum Fail {
    /// `qcow2-img: MSG` (lines after the first are printed as they are), exit 1.
    Msg(String),
    /// `qcow2-img: MSG` and `Try 'qcow2-img SUB --help' for more info`, exit 1.
    Usage(String, &'static str),
    /// getopt's `qcow2-img SUB: MSG` and the `Try ...` line, exit 1.
    Getopt(String, &'static str),
    /// Everything was already printed; exit with this code.
    Exit(u8),
}

impl Fail {
    /// Prints the failure on stderr and returns the exit code.
    pub fn report(&self) -> u8 {
        match self {
            Fail::Msg(m) => {
                eprintln!("{PROG}: {m}");
                1
            }
            Fail::Usage(m, sub) => {
                eprintln!("{PROG}: {m}");
                eprintln!("Try '{PROG} {sub} --help' for more info");
                1
            }
            Fail::Getopt(m, sub) => {
                eprintln!("{PROG} {sub}: {m}");
                eprintln!("Try '{PROG} {sub} --help' for more info");
                1
            }
            Fail::Exit(code) => *code,
        }
    }
}

/// Result of a subcommand.
pub type CmdResult = Result<(), Fail>;

/// The secrets of the command line's `--object secret,...` arguments.
static SECRETS: std::sync::OnceLock<qcow2kit::crypto::SecretStore> = std::sync::OnceLock::new();

/// Removes every `--object OBJECTDEF` (or `--object=OBJECTDEF`) from `args`
/// and defines the secrets they name, before the subcommand parses the rest
/// (qemu-img creates objects before it opens anything).
///
/// # Errors
/// QEMU's message for a bad object definition or an unreadable file.
pub fn take_objects(args: &[String]) -> Result<Vec<String>, Fail> {
    let mut store = qcow2kit::crypto::SecretStore::new();
    let mut rest = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let spec = if a == "--object" {
            match it.next() {
                Some(v) => v.as_str(),
                None => {
                    rest.push(a.clone());
                    continue;
                }
            }
        } else if let Some(v) = a.strip_prefix("--object=") {
            v
        } else {
            rest.push(a.clone());
            continue;
        };
        store
            .add_object(spec)
            .map_err(|e| Fail::Msg(e.to_string()))?;
    }
    let _ = SECRETS.set(store);
    Ok(rest)
}

/// The secrets the command line defined (empty without `--object`).
pub fn secrets() -> qcow2kit::crypto::SecretStore {
    SECRETS.get().cloned().unwrap_or_default()
}

/// `OpenOptions::new()` with the command line's secrets.
pub fn open_options() -> OpenOptions {
    OpenOptions::new().secrets(secrets())
}

/// Parses `args` (without the program and subcommand names) with clap,
/// mapping clap's errors to getopt's messages.
pub fn parse_args<T: clap::Parser>(sub: &'static str, args: &[String]) -> Result<T, Fail> {
    T::try_parse_from(args).map_err(|e| map_clap_error(sub, args, &e))
}

fn map_clap_error(sub: &'static str, args: &[String], e: &clap::Error) -> Fail {
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::UnknownArgument => {
            if arg.starts_with("--") {
                Fail::Getopt(format!("unrecognized option '{arg}'"), sub)
            } else {
                let c = arg.trim_start_matches('-').chars().next().unwrap_or('?');
                Fail::Getopt(format!("invalid option -- '{c}'"), sub)
            }
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals => {
            // A missing option argument: the option is the last word given.
            let last = args.last().map(String::as_str).unwrap_or("");
            if let Some(long) = last.strip_prefix("--") {
                let long = long.split('=').next().unwrap_or(long);
                Fail::Getopt(format!("option '--{long}' requires an argument"), sub)
            } else {
                let c = last.chars().last().unwrap_or('?');
                Fail::Getopt(format!("option requires an argument -- '{c}'"), sub)
            }
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.trim_start_matches("error: ");
            Fail::Getopt(first.to_owned(), sub)
        }
    }
}

/// `--output` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON.
    Json,
}

/// Checks an `--output` value (`--output expects 'human' or 'json' not 'X'`).
pub fn parse_output(value: Option<&str>, sub: &'static str) -> Result<Output, Fail> {
    match value {
        None | Some("human") => Ok(Output::Human),
        Some("json") => Ok(Output::Json),
        Some(other) => Err(Fail::Usage(
            format!("--output expects 'human' or 'json' not '{other}'"),
            sub,
        )),
    }
}

/// A failed library call as qemu-img reports it: QEMU's message, and the
/// hint line QEMU adds for some errors (an inconsistent bitmap).
pub fn lib_fail(e: &Error) -> Fail {
    match e.inner() {
        Error::Bitmap(b) => match b.hint() {
            Some(h) => Fail::Msg(format!("{b}\n{h}")),
            None => Fail::Msg(b.to_string()),
        },
        _ => Fail::Msg(e.qemu_message()),
    }
}

/// Checks `-f FMT` for a command that opens an existing image (only qcow2).
pub fn check_format(fmt: Option<&str>, filename: &str) -> Result<(), Fail> {
    match fmt {
        None | Some("qcow2") => Ok(()),
        Some("raw") => Err(Fail::Msg(format!(
            "Could not open '{filename}': Format 'raw' is not supported by {PROG} (qcow2 only)"
        ))),
        Some(other) => Err(Fail::Msg(format!(
            "Could not open '{filename}': Unknown driver '{other}'"
        ))),
    }
}

/// The text after `Could not open 'FILE': ` for a failed open: QEMU's file
/// layer repeats `Could not open 'FILE': ` before the OS error.
pub fn open_error_text(filename: &str, e: &Error) -> String {
    // The caller names the file: see through the library's `Error::Opening`.
    match e.inner() {
        Error::Io { .. } | Error::Open { .. } => {
            format!("Could not open '{filename}': {}", e.qemu_message())
        }
        _ => e.qemu_message(),
    }
}

/// qemu-img's message for a failed open: `Could not open 'F': ...`.
pub fn open_fail(filename: &str, e: &Error) -> Fail {
    Fail::Msg(format!(
        "Could not open '{filename}': {}",
        open_error_text(filename, e)
    ))
}

/// Opens `filename` read-only; with `backing`, its whole chain too.
#[allow(dead_code)] // for commands without -U
pub fn open_ro(filename: &str, backing: bool) -> Result<Image, Fail> {
    open_ro_shared(filename, backing, false)
}

/// [`open_ro`], with `-U` (`force-share=on`: QEMU's locks neither block nor
/// are blocked by other users of the files).
pub fn open_ro_shared(filename: &str, backing: bool, force_share: bool) -> Result<Image, Fail> {
    let opts = open_options().read_only(true).force_share(force_share);
    let r = if backing {
        Image::open(filename, &opts)
    } else {
        Image::open_without_backing(filename, &opts)
    };
    r.map_err(|e| open_fail(filename, &e))
}

/// Opens an image with its backing chain and the given (read-only)
/// options, mapping failures to qemu-img's messages.
pub fn open_ro_with(filename: &str, opts: OpenOptions) -> Result<Image, Fail> {
    Image::open(filename, &opts).map_err(|e| open_fail(filename, &e))
}

/// Opens a command's image argument: with `--image-opts` an option string
/// (`driver=qcow2,file.filename=F,encrypt.key-secret=ID,...`) applied over
/// `opts`, as qemu-img takes it; otherwise a file name checked against `-f`.
/// `backing` opens the backing chain too.
///
/// # Errors
/// qemu-img's messages: `--image-opts and --format are mutually exclusive`,
/// a bad option string, a failed open.
pub fn open_image_arg(
    name: &str,
    image_opts: bool,
    format: Option<&str>,
    opts: OpenOptions,
    backing: bool,
) -> Result<Image, Fail> {
    let (path, opts) = if image_opts {
        if format.is_some() {
            return Err(Fail::Msg(
                "--image-opts and --format are mutually exclusive".into(),
            ));
        }
        let mut o = opts;
        o.apply_qemu_str(name)
            .map_err(|e| Fail::Msg(format!("Could not open '{name}': {e}")))?;
        let file = o
            .filename()
            .map(std::path::Path::to_path_buf)
            .ok_or_else(|| {
                Fail::Msg(format!(
                    "Could not open '{name}': A block device must be specified for \"file\""
                ))
            })?;
        (file, o)
    } else {
        check_format(format, name)?;
        (std::path::PathBuf::from(name), opts)
    };
    let r = if backing {
        Image::open(&path, &opts)
    } else {
        Image::open_without_backing(&path, &opts)
    };
    // A file error names the file, after the option string.
    r.map_err(|e| {
        Fail::Msg(format!(
            "Could not open '{name}': {}",
            open_error_text(&path.to_string_lossy(), &e)
        ))
    })
}

/// Whether an `-o` argument asks for the option list (`-o help`).
pub fn wants_help(options: &[String]) -> bool {
    options
        .iter()
        .any(|o| qcow2kit::cli_support::option_string_wants_help(o))
}

/// The option list printed for `-o help` (qemu-img's text differs; the
/// contract only asks for exit 0).
pub fn print_create_options_help() {
    println!("Supported options:");
    for (name, what) in [
        ("backing_file", "File name of a base image"),
        ("backing_fmt", "Image format of the base image"),
        ("cluster_size", "qcow2 cluster size"),
        ("compat", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        (
            "compression_type",
            "Compression method used for image cluster compression",
        ),
        ("data_file", "File name of an external data file"),
        (
            "data_file_raw",
            "The external data file must stay valid as a raw image",
        ),
        ("extended_l2", "Extended L2 tables"),
        ("lazy_refcounts", "Postpone refcount updates"),
        ("nocow", "Turn off copy-on-write (valid only on btrfs)"),
        (
            "preallocation",
            "Preallocation mode (allowed values: off, metadata, falloc, full)",
        ),
        ("refcount_bits", "Width of a reference count entry in bits"),
        ("size", "Virtual disk size"),
    ] {
        println!("  {name:<24}- {what}");
    }
}
