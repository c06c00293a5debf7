//! `qcow2-img bench` (`cli.md` §11): COUNT requests of BUFFER_SIZE bytes,
//! DEPTH of them in flight, issued by DEPTH threads sharing one image.

use crate::common::{check_format, open_fail, parse_args, CmdResult, Fail};
use clap::Parser;
use qcow2kit::options::parse_size;
use qcow2kit::Image;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(short = 'c', long = "count")]
    count: Option<String>,
    #[arg(short = 'd', long = "depth")]
    depth: Option<String>,
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[arg(short = 'n', long = "native")]
    native: bool,
    #[arg(short = 'i', long = "aio")]
    aio: Option<String>,
    #[arg(short = 'o', long = "offset")]
    offset: Option<String>,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 's', long = "buffer-size")]
    buffer_size: Option<String>,
    #[arg(short = 'S', long = "step-size")]
    step_size: Option<String>,
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    #[arg(short = 'w', long = "write")]
    write: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(long = "pattern")]
    pattern: Option<String>,
    #[arg(long = "flush-interval")]
    flush_interval: Option<String>,
    #[arg(long = "no-drain")]
    no_drain: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "bench";

/// C `strtol`-like positive integer parse (decimal or `0x` hex).
fn parse_int(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Runs `bench`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::BENCH);
        return Ok(());
    }
    let _ = (a.native, &a.aio, a.quiet);
    // qemu-img's cache modes; its commands default to write-back.
    let cache = crate::io::CacheMode::parse(a.cache.as_deref().unwrap_or("writeback"))
        .ok_or_else(|| Fail::Msg("Invalid cache mode".into()))?;
    let count = match &a.count {
        None => 75000,
        Some(s) => parse_int(s)
            .filter(|&c| c >= 1 && c <= i32::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid request count specified: '{s}'.")))?,
    };
    let depth = match &a.depth {
        None => 64,
        Some(s) => parse_int(s)
            .filter(|&d| d >= 1 && d <= i32::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid queue depth specified: '{s}'.")))?,
    };
    let offset = match &a.offset {
        None => 0,
        Some(s) => parse_size(s)
            .ok()
            .filter(|&o| o <= i64::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid offset specified: '{s}'.")))?,
    };
    let bufsize = match &a.buffer_size {
        None => 4096,
        Some(s) => parse_size(s)
            .ok()
            .filter(|&b| b >= 1 && b <= i32::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid buffer size specified: '{s}'.")))?,
    };
    let step = match &a.step_size {
        None => bufsize,
        Some(s) => parse_size(s)
            .ok()
            .filter(|&b| b <= i32::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid step size specified: '{s}'.")))?,
    };
    let pattern = match &a.pattern {
        None => 0u8,
        Some(s) => parse_int(s)
            .and_then(|p| u8::try_from(p).ok())
            .ok_or_else(|| {
                Fail::Msg("Invalid pattern byte specified. Must be between 0 and 255.".into())
            })?,
    };
    let flush_interval = match &a.flush_interval {
        None => 0,
        Some(s) => parse_int(s)
            .filter(|&f| f <= i32::MAX as u64)
            .ok_or_else(|| Fail::Msg(format!("Invalid flush interval specified: '{s}'.")))?,
    };
    if a.rest.len() != 1 {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    }
    if flush_interval > 0 && !a.write {
        return Err(Fail::Msg(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    if flush_interval > 0 && flush_interval < depth {
        return Err(Fail::Msg(
            "Flush interval can't be smaller than depth".into(),
        ));
    }
    let filename = &a.rest[0];
    let opts = if a.image_opts {
        let mut o = cache.apply(crate::common::open_options());
        o.apply_qemu_str(filename)
            .map_err(|e| Fail::Msg(e.to_string()))?;
        let share = a.force_share || o.get_force_share();
        o.read_only(!a.write).force_share(share)
    } else {
        check_format(a.format.as_deref(), filename)?;
        cache
            .apply(crate::common::open_options())
            .read_only(!a.write)
            .force_share(a.force_share)
    };
    let writethrough = cache.writethrough;
    let path = opts
        .filename()
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| filename.into());
    let img = Image::open(&path, &opts).map_err(|e| open_fail(filename, &e))?;
    let img = Arc::new(img);
    let image_size = img.size();

    println!(
        "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel \
         (starting at offset {offset}, step size {step})",
        if a.write { "write" } else { "read" }
    );
    if flush_interval > 0 {
        println!("Sending flush every {flush_interval} requests");
    }

    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    // Writers hold it for reading; a draining flush takes it for writing.
    let drain = Arc::new(RwLock::new(()));
    let start = Instant::now();
    let workers: Vec<_> = (0..depth.min(count))
        .map(|_| {
            let (img, next, failed, drain) =
                (img.clone(), next.clone(), failed.clone(), drain.clone());
            let (write, no_drain) = (a.write, a.no_drain);
            std::thread::spawn(move || {
                let mut buf = vec![pattern; bufsize as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    // QEMU: offset += step, then offset %= image_size - bufsize.
                    let mut off = offset.wrapping_add(i.wrapping_mul(step));
                    if i > 0 {
                        if image_size <= bufsize {
                            off = 0;
                        } else {
                            off %= image_size - bufsize;
                        }
                    }
                    let len = bufsize.min(image_size.saturating_sub(off)) as usize;
                    let r = if write {
                        let _g = drain.read();
                        // Write-through: each write is flushed (QEMU's
                        // FUA emulation); a failed flush fails the request.
                        img.write_at(&buf[..len], off).and_then(|_| {
                            if writethrough {
                                img.flush()
                            } else {
                                Ok(())
                            }
                        })
                    } else {
                        img.read_at(&mut buf[..len], off)
                    };
                    if let Err(e) = r {
                        eprintln!(
                            "{}: Failed request: {}",
                            crate::common::PROG,
                            e.errno_text()
                        );
                        failed.store(true, Ordering::SeqCst);
                        break;
                    }
                    if flush_interval > 0 && (i + 1) % flush_interval == 0 {
                        let r = if no_drain {
                            img.flush()
                        } else {
                            let _g = drain.write();
                            img.flush()
                        };
                        if let Err(e) = r {
                            eprintln!(
                                "{}: Failed flush request: {}",
                                crate::common::PROG,
                                e.errno_text()
                            );
                            failed.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        if w.join().is_err() {
            // A worker that panicked did not finish its requests.
            failed.store(true, Ordering::SeqCst);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = !failed.load(Ordering::SeqCst);
    if ok {
        println!("Run completed in {elapsed:.3} seconds.");
    }
    // Every worker has ended, so this is the last handle; it is closed
    // (and a failure reported) whether or not the run failed.
    let closed = match Arc::try_unwrap(img) {
        Ok(img) => img.close().map_err(|e| Fail::Msg(e.qemu_message())),
        Err(_) => Err(Fail::Msg("image still in use at close".into())),
    };
    match (ok, closed) {
        (true, r) => r,
        (false, Ok(())) => Err(Fail::Exit(1)),
        (false, Err(f)) => {
            let code = f.report();
            Err(Fail::Exit(code))
        }
    }
}
