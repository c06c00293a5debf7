//! `qcow2-img serve --nbd` (`cli.md` §24): exports the image's guest view
//! over NBD (≙ `qemu-nbd -t -f qcow2`) until SIGTERM or SIGINT, then stops
//! accepting, lets requests in progress finish, flushes and closes the
//! image cleanly. `qcow2-img serve --vhost-user-blk` (Linux, feature
//! `vhost-user`) does the same over a vhost-user socket (≙
//! `qemu-storage-daemon --export type=vhost-user-blk`).

use crate::common::{check_format, open_fail, parse_args, CmdResult, Fail};
use clap::Parser;
use qcow2kit::export::nbd::{Listener, ServeConfig, Server};
use qcow2kit::{Image, OpenOptions};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(long = "nbd")]
    nbd: bool,
    #[arg(long = "vhost-user-blk")]
    vhost_user_blk: bool,
    #[arg(long = "num-queues")]
    num_queues: Option<String>,
    #[arg(long = "serial")]
    serial: Option<String>,
    #[arg(short = 'k', long = "socket")]
    socket: Option<String>,
    #[arg(short = 'b', long = "bind")]
    bind: Option<String>,
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    #[arg(short = 'x', long = "export")]
    export: Option<String>,
    #[arg(short = 'e', long = "shared")]
    shared: Option<String>,
    #[arg(long = "discard")]
    discard: Option<String>,
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'B', long = "bitmap", action = clap::ArgAction::Append)]
    bitmap: Vec<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "serve";

/// `qcow2-img serve --help`.
pub const HELP: &str = "\
Usage: qcow2-img serve --nbd (--socket PATH | --bind ADDR:PORT) [--read-only]
                       [--export NAME] [--shared N] [--discard=unmap|ignore]
                       [--bitmap NAME]... [-f qcow2 | --image-opts] [-q] FILE
       qcow2-img serve --vhost-user-blk --socket PATH [--num-queues N]
                       [--serial ID] [--read-only] [-f qcow2 | --image-opts]
                       [-q] FILE

Export the image's guest view (its virtual disk, backing chain included) over
NBD until SIGTERM or SIGINT, like 'qemu-nbd -t -f qcow2', or as a
vhost-user-blk device, like 'qemu-storage-daemon --export
type=vhost-user-blk' (Linux builds with the vhost-user feature). On a signal
it stops accepting, lets requests in progress finish, flushes and closes the
image; a second signal while it stops exits at once.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  --nbd
      serve over NBD
  --vhost-user-blk
      serve a virtio-blk device over the vhost-user socket --socket PATH,
      one front-end at a time (the next one may connect when it leaves)
  --num-queues N
      vhost-user-blk: number of request queues, one worker thread each
      (1..64, default 1)
  --serial ID
      vhost-user-blk: the device id the guest reads (up to 20 bytes)
  -k, --socket PATH
      listen on the Unix domain socket PATH (removed when the server stops);
      client URI: nbd+unix:///NAME?socket=PATH
  -b, --bind ADDR:PORT
      listen on TCP (port 0 picks a free port; the address is logged);
      client URI: nbd://ADDR:PORT/NAME
  -r, --read-only
      open the image read-only and export it read-only
  -x, --export NAME
      the export's name (default: the empty name, the default export)
  -e, --shared N
      serve up to N clients at once (default 8); more wait until one leaves
  --discard=unmap|ignore
      client TRIM requests discard clusters in the image (unmap, the
      default) or are accepted and ignored
  -B, --bitmap NAME
      also export the persistent dirty bitmap NAME as the metadata context
      qemu:dirty-bitmap:NAME (like qemu-nbd -B; may be repeated; NAME must
      exist and be consistent)
  -f, --format qcow2
      format of FILE (only qcow2)
  --image-opts
      FILE is an option string (driver=qcow2,file.filename=...)
  -q, --quiet
      do not log the address, connects and disconnects on stderr (both
      export types)

Exit codes:
  0  stopped by SIGTERM or SIGINT, the image flushed and closed cleanly
  1  error: bad argument, FILE cannot be opened, the socket cannot be bound,
     the final flush fails, or a second signal cut the stop short
";

/// Runs `serve`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        print!("{HELP}");
        return Ok(());
    }
    if a.nbd && a.vhost_user_blk {
        return Err(Fail::Msg(
            "--nbd and --vhost-user-blk are mutually exclusive".into(),
        ));
    }
    if !a.nbd && !a.vhost_user_blk {
        return Err(Fail::Usage(
            "Expecting an export type (--nbd or --vhost-user-blk)".into(),
            SUB,
        ));
    }
    if !a.vhost_user_blk && (a.num_queues.is_some() || a.serial.is_some()) {
        return Err(Fail::Msg(
            "--num-queues and --serial need --vhost-user-blk".into(),
        ));
    }
    if a.vhost_user_blk && !a.bitmap.is_empty() {
        return Err(Fail::Msg("--bitmap needs --nbd".into()));
    }
    let [filename] = a.rest.as_slice() else {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    };
    let max_clients = match a.shared.as_deref() {
        None => 8,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => n,
            _ => return Err(Fail::Msg(format!("Invalid shared device number '{s}'"))),
        },
    };
    let discard = match a.discard.as_deref() {
        None | Some("unmap") | Some("on") => true,
        Some("ignore") | Some("off") => false,
        Some(other) => return Err(Fail::Msg(format!("Invalid discard mode '{other}'"))),
    };
    if a.image_opts && a.format.is_some() {
        return Err(Fail::Msg(
            "--image-opts and -f are mutually exclusive".into(),
        ));
    }
    let (path, opts) = if a.image_opts {
        let mut o = crate::common::open_options();
        o.apply_qemu_str(filename)
            .map_err(|e| Fail::Msg(e.to_string()))?;
        let o = o.read_only(a.read_only);
        let path = o
            .filename()
            .map(|p| p.to_path_buf())
            .unwrap_or_else(|| PathBuf::from(filename));
        (path, o)
    } else {
        check_format(a.format.as_deref(), filename)?;
        (
            PathBuf::from(filename),
            crate::common::open_options().read_only(a.read_only),
        )
    };
    if a.vhost_user_blk {
        return vhost::run(&a, filename, &path, &opts);
    }
    let listener = match (&a.socket, &a.bind) {
        (Some(_), Some(_)) => {
            return Err(Fail::Msg(
                "--socket and --bind are mutually exclusive".into(),
            ))
        }
        (None, None) => {
            return Err(Fail::Usage(
                "Expecting --socket PATH or --bind ADDR:PORT".into(),
                SUB,
            ))
        }
        (Some(p), None) => Listener::bind_unix(p)
            .map_err(|e| Fail::Msg(format!("Failed to bind socket to {p}: {e}")))?,
        (None, Some(b)) => Listener::bind_tcp(b.as_str())
            .map_err(|e| Fail::Msg(format!("Failed to bind socket to {b}: {e}")))?,
    };
    let img = match Image::open(&path, &opts) {
        Ok(i) => Arc::new(i),
        Err(e) => {
            if let Listener::Unix(_, p) = &listener {
                let _ = std::fs::remove_file(p);
            }
            return Err(open_fail(filename, &e));
        }
    };
    // qemu-nbd lists the contexts of its -B bitmaps last one first.
    let bitmaps: Vec<String> = a.bitmap.iter().rev().cloned().collect();
    let quiet = a.quiet;
    let cfg = ServeConfig {
        bitmaps,
        export_name: a.export.clone().unwrap_or_default(),
        max_clients,
        discard,
        log: (!quiet).then(|| {
            Arc::new(|m: &str| eprintln!("{}: {m}", crate::common::PROG))
                as qcow2kit::export::nbd::LogFn
        }),
    };
    if let Err(e) = cfg.check_bitmaps(&img) {
        if let Listener::Unix(_, p) = &listener {
            let _ = std::fs::remove_file(p);
        }
        let _ = img.shutdown();
        return Err(Fail::Msg(match e {
            // qemu-nbd's own wording for a missing bitmap.
            qcow2kit::Error::Bitmap(qcow2kit::error::BitmapError::NotFound { name }) => {
                format!("Bitmap '{name}' is not found")
            }
            e => e.qemu_message(),
        }));
    }
    let server = Server::new(img.clone(), listener, cfg);
    let stop = server.stop_flag();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        // The first signal stops the server gracefully; a second one, while
        // it is still stopping, exits at once (exit 1).
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
            .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
            .map_err(|e| Fail::Msg(format!("cannot handle signal {sig}: {e}")))?;
    }
    if !quiet {
        eprintln!(
            "{}: serving '{}' over NBD on {}{}",
            crate::common::PROG,
            a.export.as_deref().unwrap_or(""),
            server.address(),
            if img.is_read_only() {
                " (read-only)"
            } else {
                ""
            }
        );
    }
    let served = server.run();
    let closed = img.shutdown();
    if !quiet {
        eprintln!("{}: stopped", crate::common::PROG);
    }
    served.map_err(|e| Fail::Msg(e.to_string()))?;
    closed.map_err(|e| Fail::Msg(e.qemu_message()))
}

/// `--vhost-user-blk`: not in this build.
#[cfg(not(all(feature = "vhost-user", target_os = "linux")))]
mod vhost {
    use super::*;

    pub(super) fn run(_: &Args, _: &str, _: &std::path::Path, _: &OpenOptions) -> CmdResult {
        Err(Fail::Msg(
            "vhost-user-blk exports need a Linux build with the 'vhost-user' feature".into(),
        ))
    }
}

/// `--vhost-user-blk`: serve until SIGTERM/SIGINT.
#[cfg(all(feature = "vhost-user", target_os = "linux"))]
mod vhost {
    use super::*;
    use qcow2kit::export::vhost_user_blk::{self as vub, BlkBackend, BlkConfig};
    use std::sync::atomic::{AtomicBool, Ordering};

    pub(super) fn run(
        a: &Args,
        filename: &str,
        path: &std::path::Path,
        opts: &OpenOptions,
    ) -> CmdResult {
        if a.bind.is_some() || a.export.is_some() || a.shared.is_some() || a.discard.is_some() {
            return Err(Fail::Msg(
                "--bind, --export, --shared and --discard are NBD options".into(),
            ));
        }
        let Some(sock) = a.socket.as_deref() else {
            return Err(Fail::Usage("Expecting --socket PATH".into(), SUB));
        };
        let num_queues = match a.num_queues.as_deref() {
            None => 1,
            Some(s) => match s.parse::<u16>() {
                Ok(n) if (1..=vub::MAX_QUEUES).contains(&n) => n,
                _ => return Err(Fail::Msg(format!("Invalid number of queues '{s}'"))),
            },
        };
        let sock_path = PathBuf::from(sock);
        let listener = vub::bind(&sock_path).map_err(|e| Fail::Msg(e.to_string()))?;
        let img = match Image::open(path, opts) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                let _ = std::fs::remove_file(&sock_path);
                return Err(open_fail(filename, &e));
            }
        };
        let cfg = BlkConfig {
            num_queues,
            read_only: a.read_only,
            serial: a.serial.clone().unwrap_or_default(),
        };
        let backend = BlkBackend::new(img.clone(), cfg).map_err(|e| Fail::Msg(e.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
                .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
                .map_err(|e| Fail::Msg(format!("cannot handle signal {sig}: {e}")))?;
        }
        let quiet = a.quiet;
        if !quiet {
            eprintln!(
                "{}: serving vhost-user-blk on {} ({num_queues} queue{}){}",
                crate::common::PROG,
                sock_path.display(),
                if num_queues == 1 { "" } else { "s" },
                if backend.is_read_only() {
                    " (read-only)"
                } else {
                    ""
                }
            );
        }
        // The daemon blocks in accept() and in the socket's request loop, so
        // it runs on its own thread; this one waits for a signal (or for the
        // daemon to fail), then quiesces the workers and closes the image.
        // A daemon thread still blocked then ends with the process.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        {
            let backend = backend.clone();
            let stop = stop.clone();
            let sock_path = sock_path.clone();
            let log = (!quiet).then(|| {
                Arc::new(|m: &str| eprintln!("{}: {m}", crate::common::PROG)) as vub::LogFn
            });
            std::thread::Builder::new()
                .name("vhost-user".into())
                .spawn(move || {
                    let _ = done_tx.send(vub::serve(backend, listener, &sock_path, &stop, log));
                })
                .map_err(|e| Fail::Msg(format!("cannot start the vhost-user thread: {e}")))?;
        }
        let served = loop {
            if stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            match done_rx.recv_timeout(std::time::Duration::from_millis(50)) {
                Ok(r) => break r,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            }
        };
        backend.quiesce();
        let closed = img.shutdown();
        let _ = std::fs::remove_file(&sock_path);
        if !quiet {
            eprintln!("{}: stopped", crate::common::PROG);
        }
        served.map_err(|e| Fail::Msg(e.to_string()))?;
        closed.map_err(|e| Fail::Msg(e.qemu_message()))
    }
}
