//! `qcow2-img map` (`cli.md` §4), and the backing-chain walker shared with
//! `convert`: QEMU's `get_block_status` over [`Image::block_status`] of each
//! layer, with `bdrv_co_block_status`'s rules for unallocated ranges.

use crate::common::{
    lib_fail, open_image_arg, open_options, parse_args, parse_output, CmdResult, Fail, Output,
};
use clap::Parser;
use qcow2kit::image::Backing;
use qcow2kit::info::path_combine;
use qcow2kit::storage::{NbdConfig, Storage};
use qcow2kit::Extent;
use qcow2kit::{Error, Image};

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
    #[arg(long = "image-opts")]
    image_opts: bool,
    #[arg(long = "output")]
    output: Option<String>,
    #[arg(short = 's', long = "start-offset")]
    start_offset: Option<String>,
    #[arg(short = 'l', long = "max-length")]
    max_length: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'B', long = "bitmap")]
    bitmap: Option<String>,
    #[arg(num_args = 0..)]
    rest: Vec<String>,
}

const SUB: &str = "map";

/// One layer of a backing chain as the walker sees it.
pub struct Layer<'a> {
    kind: LayerKind<'a>,
    /// Virtual size of the layer.
    size: u64,
    /// Name of the file holding this layer's data (for `map`'s File column).
    data_name: String,
    /// Metadata preallocation detected (QEMU's `BDRV_BLOCK_RECURSE` case).
    prealloc: bool,
    /// The layer has extended L2 entries (subclusters).
    extended_l2: bool,
}

enum LayerKind<'a> {
    Qcow2(&'a Image),
    Raw(&'a dyn Storage),
}

/// A run of guest bytes and its status (QEMU's `MapEntry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer that defines it (or the deepest layer searched).
    pub depth: u64,
    /// Some layer allocates it.
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Has data.
    pub data: bool,
    /// Compressed data.
    pub compressed: bool,
    /// Host offset, when there is one.
    pub offset: Option<u64>,
    /// File holding the data, when there is an offset.
    pub filename: Option<String>,
}

const DATA: u8 = 1;
const ZERO: u8 = 2;
const OFFSET_VALID: u8 = 4;
const COMPRESSED: u8 = 8;

/// The layers of `top`'s chain (opened with its backing files), top first.
///
/// # Errors
/// Errors of the metadata-preallocation detection.
/// An image named by an NBD URI is named as QEMU's nbd node names itself
/// (`nbd+unix://?socket=S` for `nbd+unix:///?socket=S`).
fn nbd_name(name: &str) -> Option<String> {
    if !name.starts_with("nbd") {
        return None;
    }
    NbdConfig::from_uri(name).ok().map(|c| c.exact_filename())
}

pub fn layers<'a>(top: &'a Image, top_name: &str) -> Result<Vec<Layer<'a>>, Error> {
    let mut v = Vec::new();
    let mut img = top;
    let mut name = nbd_name(top_name).unwrap_or_else(|| top_name.to_owned());
    loop {
        let header = img.header();
        let data_name = match header.data_file_name() {
            Some(df) if img.data_file_path().is_some() => path_combine(&name, df),
            _ => name.clone(),
        };
        v.push(Layer {
            kind: LayerKind::Qcow2(img),
            size: img.size(),
            data_name,
            prealloc: img.detect_metadata_preallocation()?,
            extended_l2: header.is_extended_l2(),
        });
        let next = header
            .backing_file_name()
            .map(|b| nbd_name(b).unwrap_or_else(|| path_combine(&name, b)))
            .unwrap_or_default();
        match img.backing() {
            Some(Backing::Qcow2(b)) => {
                img = b;
                name = next;
            }
            Some(Backing::Raw { storage, size, .. }) => {
                v.push(Layer {
                    kind: LayerKind::Raw(&**storage),
                    size: *size,
                    data_name: next,
                    prealloc: false,
                    extended_l2: false,
                });
                break;
            }
            None => break,
        }
    }
    Ok(v)
}

/// Status of one layer at `offset` for at most `bytes` (clipped to the
/// layer's size): flags, length, host offset.
fn layer_status(layer: &Layer<'_>, offset: u64, bytes: u64) -> Result<(u8, u64, u64), Error> {
    let bytes = bytes.min(layer.size - offset);
    match layer.kind {
        LayerKind::Raw(storage) => {
            // file-posix's answer: the data or hole run from SEEK_DATA and
            // SEEK_HOLE; all data when the file system cannot say.
            let (is_data, len) = match storage.data_extent(offset, bytes) {
                Ok((d, n)) if n > 0 => (d, n.min(bytes)),
                _ => (true, bytes),
            };
            let flags = if is_data { DATA } else { ZERO };
            Ok((flags | OFFSET_VALID, len, offset))
        }
        LayerKind::Qcow2(img) => {
            let st = img.block_status(offset, bytes)?;
            // QEMU gives no host offset for an encrypted image's clusters
            // (nor asks the file about preallocated runs).
            let crypt = img.is_encrypted();
            let r = match st.extent {
                Extent::Data { host } => {
                    if layer.prealloc && !crypt {
                        // BDRV_BLOCK_RECURSE: ask the file whether the run is a hole.
                        let (hole, len) = file_run(img, host, st.len);
                        let zero = if hole { ZERO } else { 0 };
                        (DATA | OFFSET_VALID | zero, len, host)
                    } else {
                        (DATA | OFFSET_VALID, st.len, host)
                    }
                }
                Extent::Unallocated if layer.extended_l2 => {
                    // Unallocated subclusters of an allocated cluster keep an offset.
                    let (host, len) = alloc_run(img, offset, st.len)?;
                    match host {
                        Some(h) => (OFFSET_VALID, len, h),
                        None => (0, len, 0),
                    }
                }
                Extent::Zero { host: Some(h) } => (ZERO | OFFSET_VALID, st.len, h),
                Extent::Zero { host: None } => (ZERO, st.len, 0),
                Extent::Unallocated => (0, st.len, 0),
                Extent::Compressed { .. } => (DATA | COMPRESSED, st.len, 0),
            };
            Ok(if crypt {
                (r.0 & !OFFSET_VALID, r.1, 0)
            } else {
                r
            })
        }
    }
}

/// The run of `[host, host+max)` in the data file that is all hole or all
/// data: `(is_hole, length)` (file-posix's `SEEK_DATA`/`SEEK_HOLE` answer).
fn file_run(img: &Image, host: u64, max: u64) -> (bool, u64) {
    let (is_data, len) = img.data_extent(host, max);
    (!is_data, len)
}

/// For an unallocated run of an extended-L2 layer: the host offset of its
/// first byte if its cluster is allocated, and how far clusters keep the
/// same kind (allocated with contiguous host offsets, or not allocated).
fn alloc_run(img: &Image, offset: u64, max: u64) -> Result<(Option<u64>, u64), Error> {
    let cs = img.cluster_size();
    let first = img.host_cluster(offset)?;
    let c0 = offset & !(cs - 1);
    let mut len = (c0 + cs - offset).min(max);
    while len < max {
        let c = offset + len;
        let h = img.host_cluster(c)?;
        let same = match (first, h) {
            (None, None) => true,
            (Some(h0), Some(h)) => h == h0 + (c - c0),
            _ => false,
        };
        if !same {
            break;
        }
        len = (len + cs).min(max);
    }
    Ok((first.map(|h| h + (offset - c0)), len))
}

/// QEMU's `get_block_status`: descends the chain until a layer allocates
/// the range (or it is known to read as zeroes).
///
/// # Errors
/// Errors of the layers' metadata.
pub fn block_status(layers: &[Layer<'_>], offset: u64, bytes: u64) -> Result<MapEntry, Error> {
    let mut bytes = bytes;
    let mut depth = 0usize;
    let (flags, map, allocated) = loop {
        let layer = &layers[depth];
        let (mut flags, pnum, map) = layer_status(layer, offset, bytes)?;
        bytes = pnum;
        if flags & (DATA | ZERO) != 0 {
            break (flags, map, true);
        }
        match layers.get(depth + 1) {
            Some(next) if offset < next.size => depth += 1,
            _ => {
                flags |= ZERO;
                break (flags, map, false);
            }
        }
    };
    let has_offset = flags & OFFSET_VALID != 0;
    Ok(MapEntry {
        start: offset,
        length: bytes,
        depth: depth as u64,
        present: allocated,
        zero: flags & ZERO != 0,
        data: flags & DATA != 0,
        compressed: flags & COMPRESSED != 0,
        offset: has_offset.then_some(map),
        filename: has_offset.then(|| layers[depth].data_name.clone()),
    })
}

fn mergeable(curr: &MapEntry, next: &MapEntry) -> bool {
    if curr.length == 0 {
        return false;
    }
    if curr.zero != next.zero
        || curr.data != next.data
        || curr.compressed != next.compressed
        || curr.depth != next.depth
        || curr.present != next.present
    {
        return false;
    }
    match (curr.offset, next.offset) {
        (None, None) => true,
        (Some(a), Some(b)) => a + curr.length == b,
        _ => false,
    }
}

/// C's `%#-16x`: `0x`-prefixed hex (plain `0` for zero), left-aligned in 16.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_owned()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

fn dump(output: Output, e: &MapEntry, next: Option<&mut MapEntry>) -> Result<(), Fail> {
    match output {
        Output::Human => {
            if e.data && e.offset.is_none() {
                return Err(Fail::Msg(
                    "File contains external, encrypted or compressed clusters.".into(),
                ));
            }
            if e.data && !e.zero {
                println!(
                    "{}{}{}{}",
                    hex16(e.start),
                    hex16(e.length),
                    hex16(e.offset.unwrap_or(0)),
                    e.filename.as_deref().unwrap_or("")
                );
            }
            if let Some(n) = next {
                if !n.data || n.zero {
                    n.data = false;
                    n.zero = true;
                }
            }
        }
        Output::Json => {
            let mut s = format!(
                "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
            );
            if let Some(o) = e.offset {
                s.push_str(&format!(", \"offset\": {o}"));
            }
            s.push('}');
            if next.is_some() {
                println!("{s},");
            } else {
                print!("{s}");
            }
        }
    }
    Ok(())
}

/// `map --bitmap NAME`: the dirty and clean runs of `[start, end)` in the
/// persistent bitmap `NAME` (what an incremental backup copies). Human: the
/// dirty runs, one per line (`Offset`, `Length`, as `map`'s columns); JSON:
/// every run, `{ "start": S, "length": L, "dirty": true|false }`.
fn dirty_map(img: &Image, name: &str, start: u64, end: u64, output: Output) -> CmdResult {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = start;
    while pos < end {
        let dirty = img
            .dirty_extents(name, pos, end - pos)
            .map_err(|e| lib_fail(&e))?;
        let Some(&(last, last_len)) = dirty.last() else {
            runs.push((pos, end - pos, false));
            break;
        };
        for (o, l) in dirty {
            if o > pos {
                runs.push((pos, o - pos, false));
            }
            runs.push((o, l, true));
            pos = o + l;
        }
        pos = pos.max(last + last_len);
    }
    // Runs found by consecutive calls may touch: merge them.
    let mut merged: Vec<(u64, u64, bool)> = Vec::with_capacity(runs.len());
    for r in runs {
        match merged.last_mut() {
            Some(m) if m.2 == r.2 && m.0 + m.1 == r.0 => m.1 += r.1,
            _ => merged.push(r),
        }
    }
    match output {
        Output::Human => {
            println!("{:<16}Length", "Offset");
            for (o, l, _) in merged.iter().filter(|r| r.2) {
                println!("{}{}", hex16(*o), hex16(*l).trim_end());
            }
        }
        Output::Json => {
            let lines: Vec<String> = merged
                .iter()
                .map(|(o, l, d)| format!("{{ \"start\": {o}, \"length\": {l}, \"dirty\": {d}}}"))
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
    }
    Ok(())
}

/// Runs `map`.
pub fn run(argv: &[String]) -> CmdResult {
    let a: Args = parse_args(SUB, argv)?;
    if a.help {
        crate::help::print(crate::help::MAP);
        return Ok(());
    }
    let output = parse_output(a.output.as_deref(), SUB)?;
    if a.rest.len() != 1 {
        return Err(Fail::Usage("Expecting one image file name".into(), SUB));
    }
    let size_arg = |s: &Option<String>, what: &str| -> Result<Option<u64>, Fail> {
        s.as_deref()
            .map(|v| {
                qcow2kit::options::parse_image_size(v)
                    .map_err(|e| Fail::Msg(e.qemu_img_message(what)))
            })
            .transpose()
    };
    let start = size_arg(&a.start_offset, "offset")?.unwrap_or(0);
    let max_len = size_arg(&a.max_length, "length")?;
    let filename = &a.rest[0];
    let img = open_image_arg(
        filename,
        a.image_opts,
        a.format.as_deref(),
        open_options().read_only(true).force_share(a.force_share),
        true,
    )?;
    // With --image-opts the File column names the image file.
    let file_name = img.path().map(|p| p.to_string_lossy().into_owned());
    let filename = match &file_name {
        Some(f) if a.image_opts => f,
        _ => filename,
    };
    let mut length = img.size();
    if let Some(m) = max_len {
        length = length.min(start.saturating_add(m));
    }
    if let Some(name) = &a.bitmap {
        return dirty_map(&img, name, start, length, output);
    }
    let ls = layers(&img, filename).map_err(|e| Fail::Msg(e.qemu_message()))?;
    match output {
        Output::Human => println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to"),
        Output::Json => print!("["),
    }
    let mut curr = MapEntry {
        start,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
        filename: None,
    };
    while curr.start + curr.length < length {
        let offset = curr.start + curr.length;
        let mut next = block_status(&ls, offset, length - offset)
            .map_err(|e| Fail::Msg(format!("Could not read file metadata: {}", e.errno_text())))?;
        if mergeable(&curr, &next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            dump(output, &curr, Some(&mut next))?;
        }
        curr = next;
    }
    dump(output, &curr, None)?;
    if output == Output::Json {
        println!("]");
    }
    Ok(())
}
