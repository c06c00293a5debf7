//! The NBD wire format: constants, and pure encoders and decoders for the
//! fixed newstyle handshake, option haggling, requests and (simple and
//! structured) replies. Nothing here does I/O, so every function is tested
//! on byte slices.
//!
//! Numbers and layouts follow the protocol document of the NBD project
//! (`doc/proto.md`); all integers are big-endian.

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options a client can send during haggling.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME` (legacy: no reply, straight to transmission).
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS` (not supported: refused with `ERR_UNSUP`).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER` (one export of a `LIST`).
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    /// `NBD_REP_ERR_UNSUP`: unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = (1 << 31) | 2;
    /// `NBD_REP_ERR_INVALID`: malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) | 3;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) | 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is going down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) | 7;
    /// `NBD_REP_ERR_TOO_BIG`: the option's payload is too long.
    pub const ERR_TOO_BIG: u32 = (1 << 31) | 9;
}

/// `NBD_INFO_*` types in `NBD_REP_INFO` replies.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
pub mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Transmission commands (`NBD_CMD_*`).
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflag {
    /// `NBD_CMD_FLAG_FUA`: the write is on stable storage before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: write zeroes without deallocating.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: a read's reply is not fragmented.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail with `ENOTSUP` rather than write slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this server understands.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) | 1;
}

/// NBD error numbers (the protocol's, which are Linux's for these).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (write past the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (oversized read with structured replies).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (`FAST_ZERO` that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flags.
pub mod alloc {
    /// `NBD_STATE_HOLE`: not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`: reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Longest string (export name, context name, query) accepted, as in QEMU.
pub const MAX_STRING: usize = 4096;
/// Longest option payload read into memory; longer ones are skipped and
/// answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest read or write payload (the advertised maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Most extents sent per context in one block-status reply.
pub const MAX_EXTENTS: usize = 1 << 16;

/// A protocol violation found while decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtoError {
    /// A magic number is wrong (`what` names the structure).
    BadMagic {
        /// The structure whose magic is wrong.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A payload is shorter or longer than its fields say.
    BadLength {
        /// The structure.
        what: &'static str,
    },
    /// A string is too long or not UTF-8.
    BadString {
        /// The structure holding it.
        what: &'static str,
    },
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtoError::BadMagic { what, got } => write!(f, "bad magic {got:#x} in {what}"),
            ProtoError::BadLength { what } => write!(f, "length mismatch in {what}"),
            ProtoError::BadString { what } => write!(f, "invalid string in {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A cursor over an option payload; every read is bounds-checked.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::BadLength { what: self.what });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.take(4).map(be32)
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(ProtoError::BadString { what: self.what });
        }
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString { what: self.what })
    }
    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::BadLength { what: self.what })
        }
    }
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option header: the option and the length of its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*`.
    pub option: u32,
    /// Payload length in bytes.
    pub len: u32,
}

/// Decodes the 16-byte header of a client option.
///
/// # Errors
/// [`ProtoError::BadMagic`] when it does not start with `IHAVEOPT`.
pub fn decode_option_header(b: &[u8; 16]) -> Result<OptionHeader, ProtoError> {
    let magic = be64(b);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            got: magic,
        });
    }
    Ok(OptionHeader {
        option: be32(&b[8..]),
        len: be32(&b[12..]),
    })
}

/// An option reply: magic, option, reply type, length, payload.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    // Payloads are built here from bounded strings; saturate rather than wrap.
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// The payload of an `NBD_REP_SERVER` reply (one export of a `LIST`).
pub fn encode_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + name.len());
    v.extend_from_slice(&info::NAME.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    for x in [min, preferred, max] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

/// What the server sends after `NBD_OPT_EXPORT_NAME`: size, flags and,
/// unless the client asked for none, 124 zero bytes.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.resize(v.len() + 124, 0);
    }
    v
}

/// A decoded `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoRequest {
    /// The export asked for.
    pub name: String,
    /// The `NBD_INFO_*` items asked for.
    pub infos: Vec<u16>,
}

/// Decodes an `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
///
/// # Errors
/// [`ProtoError::BadLength`] or [`ProtoError::BadString`] when malformed.
pub fn decode_go(data: &[u8]) -> Result<GoRequest, ProtoError> {
    let mut c = Cursor {
        buf: data,
        what: "NBD_OPT_GO",
    };
    let name = c.string()?;
    let n = c.u16()?;
    let mut infos = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    c.finish()?;
    Ok(GoRequest { name, infos })
}

/// A decoded `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries (`base:allocation`, `qemu:`, ...).
    pub queries: Vec<String>,
}

/// Decodes a meta-context option payload.
///
/// # Errors
/// [`ProtoError::BadLength`] or [`ProtoError::BadString`] when malformed.
pub fn decode_meta(data: &[u8]) -> Result<MetaRequest, ProtoError> {
    let mut c = Cursor {
        buf: data,
        what: "meta context option",
    };
    let export = c.string()?;
    let n = c.u32()?;
    // Each query takes at least 4 bytes: bound the allocation by the payload.
    let mut queries = Vec::with_capacity((n as usize).min(data.len() / 4));
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// The metadata contexts this server offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero flags.
    BaseAllocation,
    /// `qemu:allocation-depth`: which layer of the backing chain allocates.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` for the `n`-th exported persistent bitmap
    /// (see [`MetaContext::all`]): [`DIRTY`] for the dirty runs.
    DirtyBitmap(u32),
}

/// The flag of a dirty run in a `qemu:dirty-bitmap:NAME` context
/// (`NBD_STATE_DIRTY`); clean runs have none.
pub const DIRTY: u32 = 1;

/// The prefix of a dirty bitmap context's name.
pub const DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

impl MetaContext {
    /// Every context, in the order they are listed, for an export of the
    /// persistent bitmaps `bitmaps`.
    pub fn all(bitmaps: &[String]) -> Vec<MetaContext> {
        let n = u32::try_from(bitmaps.len()).unwrap_or(u32::MAX);
        [MetaContext::BaseAllocation, MetaContext::AllocationDepth]
            .into_iter()
            .chain((0..n).map(MetaContext::DirtyBitmap))
            .collect()
    }

    /// The context's name on the wire (`bitmaps`: the exported bitmaps).
    pub fn name(self, bitmaps: &[String]) -> String {
        match self {
            MetaContext::BaseAllocation => "base:allocation".into(),
            MetaContext::AllocationDepth => "qemu:allocation-depth".into(),
            MetaContext::DirtyBitmap(i) => format!(
                "{DIRTY_BITMAP_PREFIX}{}",
                usize::try_from(i)
                    .ok()
                    .and_then(|i| bitmaps.get(i))
                    .map_or("", String::as_str)
            ),
        }
    }

    /// The id the server gives it.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
            MetaContext::DirtyBitmap(i) => i.saturating_add(3),
        }
    }

    /// The context with id `id` of an export of `bitmaps`.
    pub fn from_id(id: u32, bitmaps: &[String]) -> Option<MetaContext> {
        Self::all(bitmaps).into_iter().find(|c| c.id() == id)
    }
}

/// The contexts matching `queries` for an export of the persistent bitmaps
/// `bitmaps`: exact names, or a namespace prefix (`base:`, `qemu:`,
/// `qemu:dirty-bitmap:`) for a `LIST`. No queries in a `LIST` means all.
pub fn match_contexts(queries: &[String], list: bool, bitmaps: &[String]) -> Vec<MetaContext> {
    let all = MetaContext::all(bitmaps);
    if queries.is_empty() {
        return if list { all } else { Vec::new() };
    }
    let mut out = Vec::new();
    for q in queries {
        for &c in &all {
            let name = c.name(bitmaps);
            let hit = q == &name
                || (list && q.ends_with(':') && name.starts_with(q.as_str()))
                // qemu treats `qemu:` as all its contexts for SET too.
                || (q == "qemu:" && c != MetaContext::BaseAllocation);
            if hit && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// The payload of an `NBD_REP_META_CONTEXT` reply.
pub fn encode_meta_context(c: MetaContext, bitmaps: &[String]) -> Vec<u8> {
    let name = c.name(bitmaps);
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&c.id().to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub cmd: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length (payload length for writes).
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Decodes a 28-byte request header.
///
/// # Errors
/// [`ProtoError::BadMagic`] when the magic is wrong (the connection cannot
/// be trusted to be in sync any more).
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let magic = be32(b);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            got: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be16(&b[4..]),
        cmd: be16(&b[6..]),
        cookie: be64(&b[8..]),
        offset: be64(&b[16..]),
        len: be32(&b[24..]),
    })
}

/// Encodes a request header (for tests and clients).
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A simple reply header (followed by the data of a successful read).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header; `len` is the payload length after it.
pub fn encode_chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// A complete final `NBD_REPLY_TYPE_ERROR` chunk with a message.
pub fn encode_error_chunk(cookie: u64, error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let len = 6 + msg.len() as u32;
    let mut v = Vec::with_capacity(20 + len as usize);
    v.extend_from_slice(&encode_chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        len,
    ));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn encode_hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&encode_chunk_header(flags, chunk::OFFSET_HOLE, cookie, 12));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk of `len` data bytes
/// (the data follows it).
pub fn encode_data_chunk_header(flags: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&encode_chunk_header(
        flags,
        chunk::OFFSET_DATA,
        cookie,
        len.saturating_add(8),
    ));
    b[20..].copy_from_slice(&offset.to_be_bytes());
    b
}

/// One extent of a block-status reply: length and context-specific flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    /// Length in bytes.
    pub len: u32,
    /// Flags (`base:allocation`, `qemu:dirty-bitmap:NAME`) or depth
    /// (`qemu:allocation-depth`).
    pub flags: u32,
}

/// Appends `e` to `v`, merging it with the last extent when the flags agree
/// and the merged length fits.
pub fn push_extent(v: &mut Vec<StatusExtent>, e: StatusExtent) {
    if let Some(last) = v.last_mut() {
        if last.flags == e.flags {
            if let Some(sum) = last.len.checked_add(e.len) {
                last.len = sum;
                return;
            }
        }
    }
    v.push(e);
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn encode_block_status_chunk(
    flags: u16,
    cookie: u64,
    context: u32,
    extents: &[StatusExtent],
) -> Vec<u8> {
    let extents = &extents[..extents.len().min(MAX_EXTENTS)];
    let len = 4 + 8 * extents.len() as u32;
    let mut v = Vec::with_capacity(20 + len as usize);
    v.extend_from_slice(&encode_chunk_header(
        flags,
        chunk::BLOCK_STATUS,
        cookie,
        len,
    ));
    v.extend_from_slice(&context.to_be_bytes());
    for e in extents {
        v.extend_from_slice(&e.len.to_be_bytes());
        v.extend_from_slice(&e.flags.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn str_field(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        let g = encode_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_checks_magic() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader { option: 7, len: 9 })
        );
        b[0] = b'X';
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::BadMagic { what: "option", .. })
        ));
    }

    #[test]
    fn option_reply_layout() {
        let r = encode_option_reply(opt::GO, rep::ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[8..12], &7u32.to_be_bytes());
        assert_eq!(&r[12..16], &1u32.to_be_bytes());
        assert_eq!(&r[16..], &0u32.to_be_bytes());
        let r = encode_option_reply(opt::LIST, rep::SERVER, &encode_server("disk0"));
        assert_eq!(&r[16..20], &9u32.to_be_bytes());
        assert_eq!(&r[20..24], &5u32.to_be_bytes());
        assert_eq!(&r[24..], b"disk0");
    }

    #[test]
    fn go_decodes_and_rejects_bad_lengths() {
        let mut d = str_field("disk0");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            decode_go(&d),
            Ok(GoRequest {
                name: "disk0".into(),
                infos: vec![1, 3]
            })
        );
        // Truncated, trailing garbage, huge name length, huge info count.
        assert!(decode_go(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(decode_go(&long).is_err());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(decode_go(&huge).is_err());
        let mut many = str_field("");
        many.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(decode_go(&many).is_err());
        assert!(decode_go(&[]).is_err());
    }

    #[test]
    fn meta_decodes_and_matches() {
        let mut d = str_field("");
        d.extend_from_slice(&2u32.to_be_bytes());
        d.extend_from_slice(&str_field("base:allocation"));
        d.extend_from_slice(&str_field("qemu:allocation-depth"));
        let m = decode_meta(&d).expect("decodes");
        assert_eq!(m.export, "");
        assert_eq!(m.queries.len(), 2);
        let none: &[String] = &[];
        let all = MetaContext::all(none);
        assert_eq!(match_contexts(&m.queries, false, none), all);
        // A count far beyond the payload is an error, not an allocation.
        let mut bad = str_field("");
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta(&bad).is_err());
        // Listing: no query means all, a namespace means its contexts.
        assert_eq!(match_contexts(&[], true, none), all);
        assert!(match_contexts(&[], false, none).is_empty());
        assert_eq!(
            match_contexts(&["base:".into()], true, none),
            vec![MetaContext::BaseAllocation]
        );
        assert_eq!(
            match_contexts(&["qemu:".into()], true, none),
            vec![MetaContext::AllocationDepth]
        );
        assert!(match_contexts(&["base:".into()], false, none).is_empty());
        assert!(
            match_contexts(&["qemu:dirty-bitmap:x".into(), "x:y".into()], false, none).is_empty()
        );
        let r = encode_meta_context(MetaContext::AllocationDepth, none);
        assert_eq!(&r[..4], &2u32.to_be_bytes());
        assert_eq!(&r[4..], b"qemu:allocation-depth");
        assert_eq!(
            MetaContext::from_id(1, none),
            Some(MetaContext::BaseAllocation)
        );
        assert_eq!(MetaContext::from_id(9, none), None);
        // Exported bitmaps: by name, by their namespace when listing.
        let bms = vec!["b0".to_string(), "x".to_string()];
        assert_eq!(
            match_contexts(
                &["qemu:dirty-bitmap:x".into(), "qemu:dirty-bitmap:y".into()],
                false,
                &bms
            ),
            vec![MetaContext::DirtyBitmap(1)]
        );
        assert_eq!(
            match_contexts(&["qemu:dirty-bitmap:".into()], true, &bms),
            vec![MetaContext::DirtyBitmap(0), MetaContext::DirtyBitmap(1)]
        );
        assert!(match_contexts(&["qemu:dirty-bitmap:".into()], false, &bms).is_empty());
        let r = encode_meta_context(MetaContext::DirtyBitmap(0), &bms);
        assert_eq!(&r[..4], &3u32.to_be_bytes());
        assert_eq!(&r[4..], b"qemu:dirty-bitmap:b0");
        assert_eq!(
            MetaContext::from_id(4, &bms),
            Some(MetaContext::DirtyBitmap(1))
        );
        assert_eq!(MetaContext::from_id(5, &bms), None);
    }

    #[test]
    fn request_round_trips_and_checks_magic() {
        let r = Request {
            flags: cflag::FUA,
            cmd: cmd::WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 65536,
            len: 4096,
        };
        let b = encode_request(&r);
        assert_eq!(decode_request(&b), Ok(r));
        let mut bad = b;
        bad[3] ^= 1;
        assert!(matches!(
            decode_request(&bad),
            Err(ProtoError::BadMagic {
                what: "request",
                ..
            })
        ));
    }

    #[test]
    fn replies_layout() {
        let s = encode_simple_reply(errno::EINVAL, 42);
        assert_eq!(&s[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[4..8], &22u32.to_be_bytes());
        assert_eq!(&s[8..], &42u64.to_be_bytes());

        let e = encode_error_chunk(7, errno::EIO, "boom");
        assert_eq!(&e[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&e[4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&e[6..8], &chunk::ERROR.to_be_bytes());
        assert_eq!(&e[16..20], &10u32.to_be_bytes());
        assert_eq!(&e[20..24], &5u32.to_be_bytes());
        assert_eq!(&e[24..26], &4u16.to_be_bytes());
        assert_eq!(&e[26..], b"boom");

        let h = encode_hole_chunk(0, 7, 4096, 512);
        assert_eq!(&h[6..8], &chunk::OFFSET_HOLE.to_be_bytes());
        assert_eq!(&h[16..20], &12u32.to_be_bytes());
        assert_eq!(&h[20..28], &4096u64.to_be_bytes());
        assert_eq!(&h[28..], &512u32.to_be_bytes());

        let d = encode_data_chunk_header(chunk::FLAG_DONE, 7, 8192, 100);
        assert_eq!(&d[6..8], &chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(&d[16..20], &108u32.to_be_bytes());
        assert_eq!(&d[20..], &8192u64.to_be_bytes());

        let x = encode_export_name_reply(1 << 20, 3, false);
        assert_eq!(x.len(), 134);
        assert_eq!(encode_export_name_reply(1 << 20, 3, true).len(), 10);
        assert_eq!(
            &encode_info_export(1 << 20, 0x4d)[..],
            &[0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x4d]
        );
        assert_eq!(encode_info_block_size(1, 4096, MAX_PAYLOAD).len(), 14);
        assert_eq!(&encode_info_name("a")[..], &[0, 1, b'a']);
    }

    #[test]
    fn block_status_chunk_and_merging() {
        let mut v = Vec::new();
        push_extent(&mut v, StatusExtent { len: 10, flags: 0 });
        push_extent(&mut v, StatusExtent { len: 5, flags: 0 });
        push_extent(&mut v, StatusExtent { len: 5, flags: 3 });
        push_extent(
            &mut v,
            StatusExtent {
                len: u32::MAX,
                flags: 3,
            },
        );
        assert_eq!(
            v,
            vec![
                StatusExtent { len: 15, flags: 0 },
                StatusExtent { len: 5, flags: 3 },
                StatusExtent {
                    len: u32::MAX,
                    flags: 3
                },
            ]
        );
        let c = encode_block_status_chunk(chunk::FLAG_DONE, 9, 1, &v[..2]);
        assert_eq!(&c[6..8], &chunk::BLOCK_STATUS.to_be_bytes());
        assert_eq!(&c[16..20], &20u32.to_be_bytes());
        assert_eq!(&c[20..24], &1u32.to_be_bytes());
        assert_eq!(&c[24..28], &15u32.to_be_bytes());
        assert_eq!(&c[36..40], &3u32.to_be_bytes());
    }
}
