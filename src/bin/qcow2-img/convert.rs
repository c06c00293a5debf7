//! `qcow2-img convert` (`cli.md` §5): copies the guest data of SRC (read
//! through its backing chain) into a new raw or qcow2 DST. Only ranges that
//! hold non-zero data are written: the chain walker of [`crate::map`] skips
//! unallocated and zero extents, and data buffers that are all zeroes are
//! skipped too, so raw output is sparse.

use crate::common::{check_format, open_ro_with, parse_args, CmdResult, Fail};
use crate::convert_src::{copy_compressed, percent, Src, Walk, BUF_SECTORS};
use crate::io::CacheMode;
use crate::progress::Progress;
use clap::Parser;
use qcow2kit::cli_support::{check_option_list, parse_bool_onoff, split_option_string};
use qcow2kit::image::BitmapStatus;
use qcow2kit::options::{parse_size, CreateOptions};
use qcow2kit::storage::{FileStorage, LockRequest, Locking, Storage};
use qcow2kit::{Error, Image};
use std::path::Path;

#[derive(Parser, Debug)]
#[command(
    no_binary_name = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Args {
    #[arg(short = 'h', long = "help")]
    help: bool,
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    #[arg(short = 'O')]
    out_format: Option<String>,
    #[arg(short = 'o', long = "options")]
    options: Vec<String>,
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    #[arg(short = 'p', long = "progress")]
    progress: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 't')]
    cache: Option<String>,
    #[arg(short = 'T')]
    src_cache: Option<String>,
    #[arg(short = 'm')]
    coroutines: Option<String>,
    #[arg(short = 'W')]
    out_of_order: bool,
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "bitmaps")]
    bitmaps: bool,
    #[arg(long = "skip-broken-bitmaps")]
    skip_broken_bitmaps: bool,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "convert";
/// Zero detection granularity of the output (QEMU's `-S` default is 4 KiB).
const ZERO_UNIT: usize = 4096;

/// Runs `convert`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::CONVERT);
        return Ok(());
    }
    let _ = (&a.coroutines, a.out_of_order);
    for o in &a.options {
        check_option_list(o).map_err(|e| Fail::Msg(e.to_string()))?;
    }
    if a.skip_broken_bitmaps && !a.bitmaps {
        return Err(Fail::Msg(
            "Use of --skip-broken-bitmaps requires --bitmaps".into(),
        ));
    }
    if a.bitmaps && a.rest.len() > 2 {
        return Err(Fail::Msg(
            "Copying bitmaps only possible with single source".into(),
        ));
    }
    if a.rest.len() < 2 {
        return Err(Fail::Msg("Must specify image file name".into()));
    }
    // qemu-img starts its indicator here: every later failure closes it
    // with a newline before the error.
    let mut progress = Progress::new(a.progress && !a.quiet);
    progress.start();
    if a.rest.len() > 2 {
        return Err(Fail::Msg(
            "Converting several source images into one is not supported".into(),
        ));
    }
    let (src_name, dst_name) = (&a.rest[0], &a.rest[1]);
    // qemu-img's defaults: the source write-back, the target unsafe (no
    // syncs at all).
    let src_cache =
        CacheMode::parse(a.src_cache.as_deref().unwrap_or("writeback")).ok_or_else(|| {
            Fail::Msg(format!(
                "Invalid source cache option: {}",
                a.src_cache.as_deref().unwrap_or("")
            ))
        })?;
    if a.image_opts && a.format.is_some() {
        return Err(Fail::Msg(
            "--image-opts and --format are mutually exclusive".into(),
        ));
    }
    let src = match a.format.as_deref() {
        // The source as an option string (`driver=qcow2,file.filename=F,
        // encrypt.key-secret=ID,...`), as qemu-img takes it.
        _ if a.image_opts => {
            let mut o = src_cache
                .apply(crate::common::open_options().read_only(true))
                .force_share(a.force_share);
            o.apply_qemu_str(src_name)
                .map_err(|e| Fail::Msg(format!("Could not open '{src_name}': {e}")))?;
            let file = o.filename().map(Path::to_path_buf).ok_or_else(|| {
                Fail::Msg(format!(
                    "Could not open '{src_name}': A block device must be specified for \"file\""
                ))
            })?;
            let img = Image::open(&file, &o).map_err(|e| crate::common::open_fail(src_name, &e))?;
            Src::Qcow2(Box::new(img))
        }
        Some("raw") => Src::open_raw(src_name, src_cache.direct())?,
        f => {
            check_format(f, src_name)?;
            Src::Qcow2(Box::new(open_ro_with(
                src_name,
                src_cache
                    .apply(crate::common::open_options().read_only(true))
                    .force_share(a.force_share),
            )?))
        }
    };

    let bitmaps = if a.bitmaps {
        Some(source_bitmaps(&src, a.skip_broken_bitmaps)?)
    } else {
        None
    };
    let out_fmt = a.out_format.as_deref().unwrap_or("raw");
    let raw = match out_fmt {
        "raw" => true,
        "qcow2" => false,
        other => return Err(Fail::Msg(format!("Unknown file format '{other}'"))),
    };
    let size = src.size();
    let create_opts = if raw {
        let mut prealloc = None;
        for o in &a.options {
            for (k, v) in split_option_string(o).map_err(|e| Fail::Msg(e.to_string()))? {
                match k.as_str() {
                    "size" => {
                        parse_size(&v)
                            .map_err(|e| Fail::Msg(e.into_option_error("size").to_string()))?;
                    }
                    "nocow" => {
                        parse_bool_onoff(&k, &v).map_err(|e| Fail::Msg(e.to_string()))?;
                    }
                    "preallocation" => prealloc = Some(v),
                    _ => return Err(Fail::Msg(format!("Invalid parameter '{k}'"))),
                }
            }
        }
        // The file driver's creation refuses what it cannot preallocate.
        let fail = |m: String| Fail::Msg(format!("{dst_name}: error while converting raw: {m}"));
        match prealloc.as_deref() {
            None | Some("off" | "falloc" | "full") => {}
            Some(m @ "metadata") => {
                return Err(fail(format!("Unsupported preallocation mode: {m}")))
            }
            Some(other) => return Err(fail(format!("invalid parameter value: {other}"))),
        }
        None
    } else {
        let mut opts = CreateOptions::new().secrets(crate::common::secrets());
        for o in &a.options {
            opts.apply_qemu_str(o)
                .map_err(|e| Fail::Msg(e.to_string()))?;
        }
        // qemu-img convert creates the target with the source's size,
        // whatever `-o size=` says.
        opts.size = Some(size);
        Some(opts)
    };
    if a.compress && raw {
        return Err(Fail::Msg(
            "Compression not supported for this file format".into(),
        ));
    }

    let cache = a.cache.as_deref().unwrap_or("unsafe");
    let cache = CacheMode::parse(cache)
        .ok_or_else(|| Fail::Msg(format!("Invalid cache option: {cache}")))?;
    let dst_path = Path::new(dst_name);
    // Set when the target is in use by another process: it stays as it is.
    let mut dst_busy = false;
    let result = if let Some(opts) = create_opts {
        convert_to_qcow2(
            &src,
            src_name,
            dst_name,
            &opts,
            cache,
            a.compress,
            bitmaps.as_deref(),
            &mut dst_busy,
            &mut progress,
        )
    } else if bitmaps.is_some() {
        // QEMU creates the target, then finds raw cannot hold bitmaps; the
        // (empty) target stays.
        dst_busy = true;
        FileStorage::open_for_create(dst_path, false)
            .and_then(|f| f.set_len(size))
            .map_err(|e| Fail::Msg(format!("{dst_name}: error while converting raw: {e}")))
            .and(Err(Fail::Msg(
                "Format driver 'raw' does not support bitmaps".into(),
            )))
    } else {
        convert_to_raw(
            &src,
            src_name,
            dst_path,
            size,
            cache,
            &mut dst_busy,
            &mut progress,
        )
    };
    if let Err(f) = result {
        if !dst_busy {
            let _ = std::fs::remove_file(dst_path);
        }
        return Err(f);
    }
    progress.finish();
    Ok(())
}

/// Calls `write(offset, data)` for every run of non-zero guest data of
/// `src`: the source is walked in qemu-img's chunks ([`Walk`]: status runs
/// trimmed to the source's cluster, data chunks of at most 2 MiB), data
/// chunks are read and their non-zero parts written. `progress` advances by
/// data chunk, as qemu-img's does.
fn copy_data(
    src: &Src,
    src_name: &str,
    progress: &mut Progress,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), Fail>,
) -> CmdResult {
    let ext = src
        .extents(src_name)
        .map_err(|e| Fail::Msg(e.qemu_message()))?;
    let total = src.size() / 512;
    let status_err = |sector: u64, e: Error| {
        Fail::Msg(format!(
            "error while reading block status at offset {}: {}",
            sector * 512,
            e.errno_text()
        ))
    };
    let mut walk = Walk::new(&ext, total, src.alignment_sectors(), BUF_SECTORS, None);
    let allocated = walk.data_sectors().map_err(|e| status_err(0, e))?;
    let mut buf = vec![0u8; (BUF_SECTORS * 512) as usize];
    let (mut sector, mut done) = (0u64, 0u64);
    while sector < total {
        let (n, data) = walk.chunk(sector).map_err(|e| status_err(sector, e))?;
        if data {
            done += n;
            progress.update(percent(done, allocated));
            let pos = sector * 512;
            let chunk = &mut buf[..(n * 512) as usize];
            src.read_at(chunk, pos).map_err(|err| {
                Fail::Msg(format!(
                    "error while reading at byte {pos}: {}",
                    err.errno_text()
                ))
            })?;
            // Write the non-zero parts only.
            let len = chunk.len();
            let mut i = 0usize;
            while i < len {
                let unit_end = (i + ZERO_UNIT).min(len);
                if chunk[i..unit_end].iter().all(|b| *b == 0) {
                    i = unit_end;
                    continue;
                }
                let mut j = unit_end;
                while j < len {
                    let e2 = (j + ZERO_UNIT).min(len);
                    if chunk[j..e2].iter().all(|b| *b == 0) {
                        break;
                    }
                    j = e2;
                }
                write(pos + i as u64, &chunk[i..j])?;
                i = j;
            }
        }
        sector += n;
    }
    Ok(())
}

fn convert_to_raw(
    src: &Src,
    src_name: &str,
    dst: &Path,
    size: u64,
    cache: CacheMode,
    dst_busy: &mut bool,
    progress: &mut Progress,
) -> CmdResult {
    let name = dst.display().to_string();
    let file = FileStorage::open_for_create(dst, false).map_err(|e| {
        Fail::Msg(format!(
            "{name}: error while converting raw: Could not create '{name}': {}",
            Error::io(qcow2kit::error::IoOp::Write, 0, e).qemu_message()
        ))
    })?;
    let file = if cache.direct() {
        drop(file);
        FileStorage::open_with(dst, true, true).map_err(|e| {
            Fail::Msg(format!(
                "Could not open '{name}': {}",
                Error::io(qcow2kit::error::IoOp::Write, 0, e).qemu_message()
            ))
        })?
    } else {
        file
    };
    // Locked before it is emptied, as QEMU's file creation does.
    file.lock(&LockRequest::create(Locking::Auto))
        .map_err(|e| {
            *dst_busy = true;
            Fail::Msg(format!(
                "{name}: error while converting raw: {}",
                e.qemu_message()
            ))
        })?;
    file.set_len(0)
        .map_err(|e| Fail::Msg(format!("{name}: Could not resize file: {e}")))?;
    let sync = |file: &FileStorage| {
        file.flush()
            .map_err(|e| Fail::Msg(format!("error while flushing: {e}")))
    };
    file.set_len(size)
        .map_err(|e| Fail::Msg(format!("{name}: Could not resize file: {e}")))?;
    copy_data(src, src_name, progress, |off, data| {
        file.write_at(data, off)
            .map_err(|e| Fail::Msg(format!("error while writing at byte {off}: {e}")))?;
        if cache.writethrough && !cache.no_flush() {
            sync(&file)?;
        }
        Ok(())
    })?;
    if !cache.no_flush() {
        sync(&file)?;
    }
    Ok(())
}

/// `--bitmaps`: the source's persistent bitmaps to copy, in directory
/// order, after QEMU's checks (`convert_check_bitmaps`): the source must
/// support bitmaps (a v3 qcow2 image), and an inconsistent bitmap stops
/// the conversion before the target is created unless skipped.
fn source_bitmaps(src: &Src, skip_broken: bool) -> Result<Vec<BitmapStatus>, Fail> {
    let img = match src {
        Src::Qcow2(img) if img.header().version >= 3 => img,
        _ => return Err(Fail::Msg("Source lacks bitmap support".into())),
    };
    let all = img.bitmaps().map_err(|e| Fail::Msg(e.qemu_message()))?;
    if let (false, Some(b)) = (skip_broken, all.iter().find(|b| b.inconsistent)) {
        return Err(Fail::Msg(format!(
            "Cannot copy inconsistent bitmap '{}'\n\
             Try --skip-broken-bitmaps, or use '{} bitmap --remove' to delete it",
            b.name,
            crate::common::PROG
        )));
    }
    Ok(all)
}

/// Copies the source's bitmaps into the target after its data (QEMU's
/// `convert_copy_bitmaps`): each is created with the source's granularity
/// and state, then the source's bits are merged in; inconsistent ones are
/// skipped with QEMU's warning (only `--skip-broken-bitmaps` lets them
/// through to here).
fn copy_bitmaps(src: &Src, out: &Image, bitmaps: &[BitmapStatus]) -> CmdResult {
    let Src::Qcow2(from) = src else {
        return Ok(());
    };
    for b in bitmaps {
        if b.inconsistent {
            eprintln!(
                "{}: warning: Skipping inconsistent bitmap '{}'",
                crate::common::PROG,
                b.name
            );
            continue;
        }
        let created = out.add_bitmap(&b.name, Some(b.granularity)).and_then(|()| {
            if b.enabled {
                Ok(())
            } else {
                out.disable_bitmap(&b.name)
            }
        });
        created.map_err(|e| {
            Fail::Msg(format!(
                "Failed to create bitmap {}: {}",
                b.name,
                e.qemu_message()
            ))
        })?;
        if let Err(e) = out.merge_bitmap_from(&b.name, from, &b.name) {
            let _ = out.remove_bitmap(&b.name);
            return Err(Fail::Msg(format!(
                "Failed to populate bitmap {}: {}",
                b.name,
                e.qemu_message()
            )));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // the command's settings, passed through once
fn convert_to_qcow2(
    src: &Src,
    src_name: &str,
    dst: &str,
    opts: &CreateOptions,
    cache: CacheMode,
    compress: bool,
    bitmaps: Option<&[BitmapStatus]>,
    dst_busy: &mut bool,
    progress: &mut Progress,
) -> CmdResult {
    let size = opts.size.unwrap_or_else(|| src.size());
    // qemu-img's prefix for whatever the target's creation refuses.
    let fail = |m: String| Fail::Msg(format!("{dst}: error while converting qcow2: {m}"));
    opts.validate().map_err(|e| fail(e.to_string()))?;
    let existed = Path::new(dst).exists();
    qcow2kit::create::create(Path::new(dst), opts, size).map_err(|e| match e {
        Error::Lock(_) => {
            *dst_busy = true;
            fail(e.qemu_message())
        }
        // The target itself could not be created.
        Error::Io { .. } if !existed && !Path::new(dst).exists() => {
            fail(format!("Could not create '{dst}': {}", e.qemu_message()))
        }
        _ => fail(e.qemu_message()),
    })?;
    // An encrypted target opens with the key it was created with.
    let mut out_opts = cache.apply(crate::common::open_options());
    if let Some(id) = opts.encrypt.key_secret.as_deref() {
        if opts.encrypt.is_requested() {
            out_opts = out_opts.key_secret(id);
        }
    }
    let out = Image::open(dst, &out_opts).map_err(|e| crate::common::open_fail(dst, &e))?;
    if bitmaps.is_some() && out.header().version < 3 {
        // As QEMU: found after creating the target, which stays.
        *dst_busy = true;
        let _ = out.close();
        return Err(Fail::Msg(
            "Format driver 'qcow2' does not support bitmaps".into(),
        ));
    }
    if compress {
        copy_compressed(src, src_name, &out, progress)?;
        copy_bitmaps(src, &out, bitmaps.unwrap_or_default())?;
        out.close()
            .map_err(|e| Fail::Msg(format!("error while flushing: {}", e.errno_text())))?;
        return Ok(());
    }
    copy_data(src, src_name, progress, |off, data| {
        out.write_at(data, off)
            .and_then(|_| {
                if cache.writethrough {
                    out.flush()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| {
                Fail::Msg(format!(
                    "error while writing at byte {off}: {}",
                    e.errno_text()
                ))
            })
    })?;
    copy_bitmaps(src, &out, bitmaps.unwrap_or_default())?;
    out.close()
        .map_err(|e| Fail::Msg(format!("error while flushing: {}", e.errno_text())))?;
    Ok(())
}
