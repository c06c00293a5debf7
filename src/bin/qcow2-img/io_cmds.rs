//! The qemu-io commands beyond read/write/discard (`cli.md` §23): `help`,
//! `quit`, `length`, `info`, `alloc`, `truncate`, `readv`, `writev` and the
//! `aio_*` family. Output and streams are qemu-io 10.0.2's.
//!
//! The `aio_*` requests run synchronously: each completes (and prints its
//! result) before the next command runs, so results appear in submission
//! order and `aio_flush` has nothing to wait for. As in qemu-io, a failed
//! or mismatching asynchronous request does not fail the command — only a
//! bad submission (arguments) does.

use super::{cvtnum, cvtstr, dump_buffer, getopt, parse_pattern, print_report};
use super::{Cmd, Done, State, CMDS, REQUEST_MAX_BYTES};
use crate::common::PROG;
use qcow2kit::info::ImageInfo;
use qcow2kit::options::{parse_size, Preallocation, SizeError};
use qcow2kit::Extent;
use std::time::Instant;

/// qemu-io's `help [command]` (stdout): all commands sorted by name, or
/// one command's synopsis (under the name it was asked by) and its long
/// help where qemu-io has one.
pub(super) fn help(name: Option<&str>) -> Done {
    let Some(name) = name else {
        let mut all: Vec<&Cmd> = CMDS.iter().collect();
        all.sort_by_key(|c| c.name);
        for c in all {
            println!("{}", c.usage);
        }
        println!("\nUse 'help commandname' for extended help.");
        return true;
    };
    let Some(cmd) = CMDS.iter().find(|c| c.name == name || c.alt == Some(name)) else {
        println!("command {name} not found");
        return false;
    };
    println!("{name}{}", &cmd.usage[cmd.name.len()..]);
    if let Some(text) = long_help(cmd.name) {
        print!("{text}");
    }
    true
}

/// The extended help qemu-io prints after the synopsis (`help CMD`).
fn long_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "read" => {
            "
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"
        }
        "write" => {
            "
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

"
        }
        "discard" => {
            "
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

"
        }
        "open" => {
            "
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qcow2-img commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
"
        }
        "readv" => {
            "
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"
        }
        "writev" => {
            "
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

"
        }
        "aio_read" => {
            "
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"
        }
        "aio_write" => {
            "
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

"
        }
        _ => return None,
    })
}

/// qemu-io's `create_iovec`: the total length of the buffers `LEN...`
/// (each parsed with `cvtnum`); prints the error (stdout) on failure.
fn iovec_total(lens: &[&str]) -> Option<u64> {
    let mut total = 0u64;
    for l in lens {
        let n = cvtnum(l)?;
        if n > REQUEST_MAX_BYTES {
            println!("Argument '{l}' exceeds maximum size {REQUEST_MAX_BYTES}");
            return None;
        }
        total = match total.checked_add(n) {
            Some(t) if t <= REQUEST_MAX_BYTES => t,
            _ => {
                println!("The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}");
                return None;
            }
        };
    }
    Some(total)
}

impl State {
    /// `length`: the virtual size as a human size.
    pub(super) fn length(&self) -> Done {
        let Some(img) = &self.img else { return false };
        if img.is_disabled() {
            println!("getlength: No medium found");
            return false;
        }
        println!("{}", cvtstr(img.size() as f64));
        true
    }

    /// `info`: format, cluster size, VM state offset and the same
    /// `Format specific information:` block as `qcow2-img info`.
    pub(super) fn info(&self) -> Done {
        let Some(img) = &self.img else { return false };
        // qemu-io fails silently when the driver is gone.
        if img.is_disabled() {
            return false;
        }
        let header = img.header();
        let cluster = header.cluster_size();
        // QEMU's qcow2_vm_state_offset: the guest offset just past what the
        // L1 entries needed for the disk can map.
        let per_l2 = cluster / header.l2_entry_size().max(1);
        let vm_state = header
            .l1_entries_needed(header.size)
            .and_then(|l1| l1.checked_mul(cluster))
            .and_then(|v| v.checked_mul(per_l2));
        let name = img
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let spec = match ImageInfo::from_image(img, &name) {
            Ok(i) => i.format_specific,
            Err(e) => {
                eprintln!("{PROG}: {}", e.qemu_message());
                return false;
            }
        };
        println!("format name: qcow2");
        println!("cluster size: {}", cvtstr(cluster as f64));
        match vm_state {
            Some(v) => println!("vm state offset: {}", cvtstr(v as f64)),
            None => println!("vm state offset: {}", cvtstr(u64::MAX as f64)),
        }
        if let Some(spec) = spec {
            let lines = spec.human_lines();
            if !lines.is_empty() {
                println!("Format specific information:");
                for l in lines {
                    println!("    {l}");
                }
            }
        }
        true
    }

    /// `alloc OFFSET [COUNT]`: bytes allocated in this layer within the
    /// range (clipped to the image end); COUNT defaults to 512.
    pub(super) fn alloc(&self, args: &[&str]) -> Done {
        let Some(offset) = cvtnum(args[0]) else {
            return false;
        };
        let count = match args.get(1) {
            Some(c) => match cvtnum(c) {
                Some(n) => n,
                None => return false,
            },
            None => 512,
        };
        let Some(img) = &self.img else { return false };
        let size = img.size();
        let (mut pos, mut remaining, mut count) = (offset, count, count);
        let mut sum = 0u64;
        while remaining > 0 {
            if pos >= size {
                count -= remaining;
                break;
            }
            let st = match img.block_status(pos, remaining.min(size - pos)) {
                Ok(st) if st.len > 0 => st,
                Ok(_) => {
                    count -= remaining;
                    break;
                }
                Err(e) => {
                    println!("is_allocated failed: {}", e.errno_text());
                    return false;
                }
            };
            let n = st.len.min(remaining);
            if !matches!(st.extent, Extent::Unallocated) {
                sum += n;
            }
            pos += n;
            remaining -= n;
        }
        println!(
            "{sum}/{count} bytes allocated at offset {}",
            cvtstr(offset as f64)
        );
        true
    }

    /// `truncate [-m MODE] SIZE`: changes the virtual size, shrinking
    /// without asking; the preallocation applies to the added part.
    pub(super) fn truncate(&self, cmd: &Cmd, args: &[&str]) -> Done {
        let Some((opts, pos)) = getopt(cmd, args, "m:") else {
            return false;
        };
        let mut prealloc = Preallocation::Off;
        for (o, v) in &opts {
            if let ('m', Some(m)) = (o, v) {
                match m.parse::<Preallocation>() {
                    Ok(p) => prealloc = p,
                    Err(_) => {
                        eprintln!("{PROG}: Invalid preallocation mode '{m}'");
                        return false;
                    }
                }
            }
        }
        // qemu-io parses the first operand but names `argv[1]` in a
        // syntax error; extra operands are ignored.
        let parsed = match pos.first() {
            Some(p) => parse_size(p).and_then(|v| {
                if v > i64::MAX as u64 {
                    Err(SizeError::OutOfRange {
                        input: (*p).to_owned(),
                    })
                } else {
                    Ok(v)
                }
            }),
            None => Err(SizeError::Invalid {
                input: String::new(),
            }),
        };
        let new_size = match parsed {
            Ok(v) => v,
            Err(SizeError::OutOfRange { input }) => {
                println!("{}", SizeError::OutOfRange { input }.qemu_io_message());
                return false;
            }
            Err(_) => {
                let input = args[0].to_owned();
                println!("{}", SizeError::Invalid { input }.qemu_io_message());
                return false;
            }
        };
        let Some(img) = &self.img else { return false };
        if img.is_disabled() {
            eprintln!("{PROG}: No medium inserted");
            return false;
        }
        let old = img.size();
        // qcow2_co_truncate's checks, in its order.
        let msg = if new_size % 512 != 0 {
            Some("The new size must be a multiple of 512".to_owned())
        } else if new_size < old && prealloc != Preallocation::Off {
            Some("Preallocation can't be used for shrinking an image".to_owned())
        } else {
            // Preallocating nothing (same size) changes nothing.
            let p = if new_size == old {
                Preallocation::Off
            } else {
                prealloc
            };
            img.resize_with(new_size, p, true)
                .and_then(|_| self.write_through_flush())
                .err()
                .map(|e| e.qemu_message())
        };
        match msg {
            Some(m) => {
                eprintln!("{PROG}: {m}");
                false
            }
            None => true,
        }
    }

    /// `readv`/`aio_read OFFSET LEN [LEN...]`: one read covering all
    /// buffers; results as for `read`.
    pub(super) fn readv(&self, cmd: &Cmd, args: &[&str], aio: bool) -> Done {
        let spec = if aio { "CiqrvP:" } else { "CqrvP:" };
        let Some((opts, pos)) = getopt(cmd, args, spec) else {
            return false;
        };
        let mut pattern = None;
        for (o, v) in &opts {
            if let ('P', Some(v)) = (o, v) {
                match parse_pattern(v) {
                    Some(p) => pattern = Some(p),
                    None => return false,
                }
            }
        }
        let has = |c: char| opts.iter().any(|(o, _)| *o == c);
        if pos.len() < 2 {
            println!("{}", cmd.usage);
            return false;
        }
        if aio && has('i') {
            println!("injecting invalid read request");
            return true;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let Some(count) = iovec_total(&pos[1..]) else {
            return false;
        };
        let Some(img) = &self.img else { return false };
        let mut buf = vec![0xabu8; count as usize];
        let t1 = Instant::now();
        let r = img.read_at(&mut buf, offset);
        let t = t1.elapsed();
        if let Err(e) = r {
            println!("readv failed: {}", e.errno_text());
            return aio;
        }
        let mut ok = true;
        if let Some(p) = pattern {
            if buf.iter().any(|b| *b != p) {
                println!("Pattern verification failed at offset {offset}, {count} bytes");
                ok = aio;
            }
        }
        if has('q') {
            return ok;
        }
        if has('v') {
            dump_buffer(&buf, offset);
        }
        print_report("read", t, offset, count, count, has('C'));
        ok
    }

    /// `writev`/`aio_write OFFSET LEN [LEN...]`: one write of all buffers
    /// (pattern 0xcd unless `-P`); `aio_write -z` writes zeroes.
    pub(super) fn writev(&self, cmd: &Cmd, args: &[&str], aio: bool) -> Done {
        let spec = if aio { "CfiqruzP:" } else { "CfqrP:" };
        let Some((opts, pos)) = getopt(cmd, args, spec) else {
            return false;
        };
        let has = |c: char| opts.iter().any(|(o, _)| *o == c);
        let mut pattern = 0xcdu8;
        for (o, v) in &opts {
            if let ('P', Some(v)) = (o, v) {
                match parse_pattern(v) {
                    Some(p) => pattern = p,
                    None => return false,
                }
            }
        }
        if pos.len() < 2 {
            println!("{}", cmd.usage);
            return false;
        }
        let z = aio && has('z');
        if has('u') && !z {
            println!("-u requires -z to be specified");
            return false;
        }
        if aio && has('i') {
            println!("injecting invalid write request");
            return true;
        }
        let Some(offset) = cvtnum(pos[0]) else {
            return false;
        };
        let count = if z {
            if pos.len() != 2 {
                println!("-z supports only a single length parameter");
                return false;
            }
            match cvtnum(pos[1]) {
                Some(n) => n,
                None => return false,
            }
        } else {
            match iovec_total(&pos[1..]) {
                Some(n) => n,
                None => return false,
            }
        };
        let Some(img) = &self.img else { return false };
        let t1 = Instant::now();
        let r = if z {
            img.write_zeroes(offset, count, has('u'))
        } else {
            img.write_at(&vec![pattern; count as usize], offset)
        };
        let r = r
            .map_err(|e| e.errno_text())
            .and_then(|_| self.write_through());
        let t = t1.elapsed();
        if let Err(text) = r {
            let op = if aio { "aio_write" } else { "writev" };
            println!("{op} failed: {text}");
            return aio;
        }
        if !has('q') {
            print_report("wrote", t, offset, count, count, has('C'));
        }
        true
    }

    /// In write-through mode, flushes after a truncation.
    fn write_through_flush(&self) -> qcow2kit::Result<()> {
        match (&self.img, self.writethrough) {
            (Some(img), true) => img.flush(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iovec_total_sums_and_bounds() {
        assert_eq!(iovec_total(&["4k", "4k"]), Some(8192));
        assert_eq!(iovec_total(&["512", "1k", "2k"]), Some(3584));
        assert_eq!(iovec_total(&["0"]), Some(0));
        assert_eq!(iovec_total(&["x"]), None);
        assert_eq!(iovec_total(&["2G"]), None);
        assert_eq!(iovec_total(&["1G", "1G"]), None);
    }

    #[test]
    fn every_command_has_a_synopsis_and_known_help() {
        for c in CMDS {
            assert!(c.usage.starts_with(&format!("{} ", c.name)), "{}", c.name);
            assert!(c.usage.contains(" -- "), "{}", c.name);
        }
        for n in [
            "read",
            "write",
            "discard",
            "open",
            "readv",
            "writev",
            "aio_read",
            "aio_write",
        ] {
            assert!(long_help(n).is_some_and(|t| t.starts_with('\n')), "{n}");
        }
        for n in [
            "alloc", "map", "length", "info", "truncate", "flush", "quit",
        ] {
            assert!(long_help(n).is_none(), "{n}");
        }
    }
}
