//! One client connection: the fixed newstyle handshake, option haggling and
//! the transmission phase, over any byte stream. Requests of a connection
//! are served one at a time, in order; several connections run in parallel
//! on one shared [`Image`].

use super::proto::{self, cflag, cmd, errno, opt, rep, tflag, MetaContext, Request};
use super::status;
use crate::{Error, Image};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Largest request buffer kept between requests.
const KEEP_BUFFER: usize = 4 << 20;

/// What a connection serves and how (shared by all connections).
#[derive(Debug, Clone)]
pub(crate) struct ExportConfig {
    /// The export's name.
    pub name: String,
    /// Client TRIM requests discard in the image.
    pub discard: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN` (more than one client allowed).
    pub multi_conn: bool,
    /// Persistent bitmaps exported as `qemu:dirty-bitmap:NAME` contexts.
    pub bitmaps: Vec<String>,
}

/// How a connection ended (for the log).
#[derive(Debug)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`, `NBD_OPT_ABORT` or the client closed the socket.
    Client,
    /// The server is shutting down.
    Shutdown,
    /// A protocol violation the connection cannot recover from.
    Protocol(String),
    /// A socket error.
    Io(io::Error),
}

/// A request whose outcome is an NBD error.
struct Fail {
    errno: u32,
    msg: String,
}

impl Fail {
    fn new(errno: u32, msg: impl Into<String>) -> Self {
        Fail {
            errno,
            msg: msg.into(),
        }
    }
}

/// The NBD error for an image error.
fn errno_of(e: &Error) -> u32 {
    match e {
        Error::ReadOnly => errno::EPERM,
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => errno::EINVAL,
        Error::Unsupported(_) => errno::ENOTSUP,
        Error::TooLarge(_) => errno::EOVERFLOW,
        Error::Closed => errno::ESHUTDOWN,
        _ if e.raw_os_error() == Some(libc::ENOSPC) => errno::ENOSPC,
        _ => errno::EIO,
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::new(errno_of(&e), e.to_string())
    }
}

/// A connection in progress.
pub(crate) struct Conn<'a, S: Read + Write> {
    s: S,
    img: &'a Image,
    cfg: &'a ExportConfig,
    stop: &'a AtomicBool,
    size: u64,
    read_only: bool,
    structured: bool,
    no_zeroes: bool,
    contexts: Vec<MetaContext>,
    buf: Vec<u8>,
}

/// Outcome of a read that can be interrupted by a shutdown.
enum Got {
    All,
    Stopped,
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl<'a, S: Read + Write> Conn<'a, S> {
    /// A connection over `s`, which should have a short read timeout so a
    /// shutdown (`stop`) is noticed while waiting for the client.
    pub(crate) fn new(s: S, img: &'a Image, cfg: &'a ExportConfig, stop: &'a AtomicBool) -> Self {
        Conn {
            s,
            img,
            cfg,
            stop,
            size: img.size(),
            read_only: img.is_read_only(),
            structured: false,
            no_zeroes: false,
            contexts: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Runs the handshake and then serves requests until the client leaves,
    /// the server stops or the client breaks the protocol.
    pub(crate) fn run(&mut self) -> End {
        match self.handshake() {
            Ok(true) => {}
            Ok(false) => return End::Client,
            Err(e) => return e,
        }
        loop {
            match self.request() {
                Ok(true) => {}
                Ok(false) => return End::Client,
                Err(e) => return e,
            }
        }
    }

    /// Fills `buf`; at a shutdown, gives up when the client is idle.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<Got, End> {
        let mut got = 0;
        while got < buf.len() {
            match self.s.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(if got == 0 {
                        End::Client
                    } else {
                        End::Protocol("connection closed in the middle of a message".into())
                    })
                }
                Ok(n) => got += n,
                Err(e) if is_timeout(&e) => {
                    if self.stop.load(Ordering::SeqCst) {
                        return Ok(Got::Stopped);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(End::Client),
                Err(e) => return Err(End::Io(e)),
            }
        }
        Ok(Got::All)
    }

    /// Like [`Conn::read_full`], a shutdown being an [`End`].
    fn read_or_end(&mut self, buf: &mut [u8]) -> Result<(), End> {
        match self.read_full(buf)? {
            Got::All => Ok(()),
            Got::Stopped => Err(End::Shutdown),
        }
    }

    /// Reads `n` payload bytes into the connection's buffer (`n` is bounded
    /// by the caller).
    fn read_payload(&mut self, n: usize) -> Result<(), End> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.resize(n, 0);
        let r = self.read_or_end(&mut buf);
        self.buf = buf;
        r
    }

    /// Reads and drops `n` bytes without holding them.
    fn skip(&mut self, mut n: u64) -> Result<(), End> {
        let mut chunk = [0u8; 4096];
        while n > 0 {
            let k = n.min(chunk.len() as u64) as usize;
            self.read_or_end(&mut chunk[..k])?;
            n -= k as u64;
        }
        Ok(())
    }

    fn send(&mut self, b: &[u8]) -> Result<(), End> {
        self.s.write_all(b).map_err(|e| {
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) {
                End::Client
            } else {
                End::Io(e)
            }
        })
    }

    fn transmission_flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
        if self.structured {
            f |= tflag::SEND_DF;
        }
        if self.cfg.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        f
    }

    fn opt_reply(&mut self, option: u32, reply: u32, data: &[u8]) -> Result<(), End> {
        self.send(&proto::encode_option_reply(option, reply, data))
    }

    // ------------------------------------------------------------------
    // Handshake.
    // ------------------------------------------------------------------

    /// The fixed newstyle handshake and option haggling. `Ok(true)`: go to
    /// transmission; `Ok(false)`: the client aborted.
    fn handshake(&mut self) -> Result<bool, End> {
        self.send(&proto::encode_greeting())?;
        let mut f = [0u8; 4];
        self.read_or_end(&mut f)?;
        let flags = u32::from_be_bytes(f);
        if flags & !(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES) != 0 {
            return Err(End::Protocol(format!("unknown client flags {flags:#x}")));
        }
        self.no_zeroes = flags & proto::CLIENT_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; 16];
            self.read_or_end(&mut h)?;
            let h = proto::decode_option_header(&h).map_err(|e| End::Protocol(e.to_string()))?;
            if h.len > proto::MAX_OPTION_LEN {
                if h.option == opt::EXPORT_NAME {
                    return Err(End::Protocol("export name too long".into()));
                }
                self.skip(u64::from(h.len))?;
                self.opt_reply(h.option, rep::ERR_TOO_BIG, b"option too long")?;
                continue;
            }
            self.read_payload(h.len as usize)?;
            let data = std::mem::take(&mut self.buf);
            let r = self.option(h.option, &data);
            self.buf = data;
            match r? {
                OptNext::More => {}
                OptNext::Transmission => return Ok(true),
                OptNext::Abort => return Ok(false),
            }
            if self.stop.load(Ordering::SeqCst) {
                return Err(End::Shutdown);
            }
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<OptNext, End> {
        let name = self.cfg.name.clone();
        match option {
            opt::EXPORT_NAME => {
                if data != name.as_bytes() {
                    // No way to answer but to hang up.
                    return Err(End::Protocol(format!(
                        "export '{}' not present",
                        String::from_utf8_lossy(data)
                    )));
                }
                let r = proto::encode_export_name_reply(
                    self.size,
                    self.transmission_flags(),
                    self.no_zeroes,
                );
                self.send(&r)?;
                Ok(OptNext::Transmission)
            }
            opt::ABORT => {
                // The client may already have closed: ignore a failed send.
                let _ = self.opt_reply(option, rep::ACK, &[]);
                Ok(OptNext::Abort)
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.opt_reply(option, rep::ERR_INVALID, b"LIST takes no payload")?;
                } else {
                    self.opt_reply(option, rep::SERVER, &proto::encode_server(&name))?;
                    self.opt_reply(option, rep::ACK, &[])?;
                }
                Ok(OptNext::More)
            }
            opt::INFO | opt::GO => {
                let go = match proto::decode_go(data) {
                    Ok(g) => g,
                    Err(e) => {
                        self.opt_reply(option, rep::ERR_INVALID, e.to_string().as_bytes())?;
                        return Ok(OptNext::More);
                    }
                };
                if go.name != name {
                    let msg = format!("export '{}' not present", go.name);
                    self.opt_reply(option, rep::ERR_UNKNOWN, msg.as_bytes())?;
                    return Ok(OptNext::More);
                }
                let export = proto::encode_info_export(self.size, self.transmission_flags());
                self.opt_reply(option, rep::INFO, &export)?;
                if go.infos.contains(&proto::info::NAME) {
                    self.opt_reply(option, rep::INFO, &proto::encode_info_name(&name))?;
                }
                let bs =
                    proto::encode_info_block_size(1, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD);
                self.opt_reply(option, rep::INFO, &bs)?;
                self.opt_reply(option, rep::ACK, &[])?;
                Ok(if option == opt::GO {
                    OptNext::Transmission
                } else {
                    OptNext::More
                })
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.opt_reply(
                        option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no payload",
                    )?;
                } else {
                    self.structured = true;
                    self.opt_reply(option, rep::ACK, &[])?;
                }
                Ok(OptNext::More)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = option == opt::SET_META_CONTEXT;
                if !self.structured {
                    self.opt_reply(
                        option,
                        rep::ERR_INVALID,
                        b"structured replies must be negotiated first",
                    )?;
                    return Ok(OptNext::More);
                }
                let m = match proto::decode_meta(data) {
                    Ok(m) => m,
                    Err(e) => {
                        self.opt_reply(option, rep::ERR_INVALID, e.to_string().as_bytes())?;
                        return Ok(OptNext::More);
                    }
                };
                if m.export != name {
                    let msg = format!("export '{}' not present", m.export);
                    self.opt_reply(option, rep::ERR_UNKNOWN, msg.as_bytes())?;
                    return Ok(OptNext::More);
                }
                let bitmaps = &self.cfg.bitmaps;
                let found = proto::match_contexts(&m.queries, !set, bitmaps);
                for c in &found {
                    let payload = proto::encode_meta_context(*c, bitmaps);
                    self.opt_reply(option, rep::META_CONTEXT, &payload)?;
                }
                if set {
                    self.contexts = found;
                }
                self.opt_reply(option, rep::ACK, &[])?;
                Ok(OptNext::More)
            }
            opt::STARTTLS => {
                self.opt_reply(option, rep::ERR_POLICY, b"TLS is not supported")?;
                Ok(OptNext::More)
            }
            _ => {
                let msg = format!("option {option} is not supported");
                self.opt_reply(option, rep::ERR_UNSUP, msg.as_bytes())?;
                Ok(OptNext::More)
            }
        }
    }

    // ------------------------------------------------------------------
    // Transmission.
    // ------------------------------------------------------------------

    /// Serves one request. `Ok(false)`: the client disconnected cleanly.
    fn request(&mut self) -> Result<bool, End> {
        let mut h = [0u8; proto::REQUEST_LEN];
        self.read_or_end(&mut h)?;
        let req = proto::decode_request(&h).map_err(|e| End::Protocol(e.to_string()))?;
        if req.cmd == cmd::DISC {
            return Ok(false);
        }
        if req.cmd == cmd::WRITE {
            if req.len > proto::MAX_PAYLOAD {
                // The payload cannot be taken in: answer, then hang up (the
                // stream is out of sync).
                self.reply_error(
                    &req,
                    Fail::new(
                        errno::EINVAL,
                        "request length exceeds the maximum block size",
                    ),
                )?;
                return Err(End::Protocol(format!(
                    "write of {} bytes exceeds the maximum",
                    req.len
                )));
            }
            self.read_payload(req.len as usize)?;
        }
        let r = self.execute(&req);
        match r {
            Ok(Done::Replied) => {}
            Ok(Done::Simple) => self.send(&proto::encode_simple_reply(0, req.cookie))?,
            Err(f) => self.reply_error(&req, f)?,
        }
        if self.buf.capacity() > KEEP_BUFFER {
            // Do not hold a 32 MiB buffer per idle client.
            self.buf = Vec::new();
        }
        Ok(true)
    }

    fn reply_error(&mut self, req: &Request, f: Fail) -> Result<(), End> {
        if self.structured {
            self.send(&proto::encode_error_chunk(req.cookie, f.errno, &f.msg))
        } else {
            self.send(&proto::encode_simple_reply(f.errno, req.cookie))
        }
    }

    /// The end of `req`'s range, when it lies inside the export.
    fn in_range(&self, req: &Request) -> Option<u64> {
        req.offset
            .checked_add(u64::from(req.len))
            .filter(|&end| end <= self.size)
    }

    fn execute(&mut self, req: &Request) -> Result<Done, Fail> {
        let allowed = match req.cmd {
            cmd::READ => cflag::DF,
            cmd::WRITE | cmd::TRIM => cflag::FUA,
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            cmd::FLUSH | cmd::CACHE => 0,
            other => return Err(Fail::new(errno::EINVAL, format!("unknown command {other}"))),
        };
        // FUA is harmless on any command; others only where they mean something.
        if req.flags & !(allowed | cflag::FUA) != 0 {
            return Err(Fail::new(
                errno::EINVAL,
                format!("invalid flags {:#x} for command {}", req.flags, req.cmd),
            ));
        }
        let writes = matches!(req.cmd, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && self.read_only {
            return Err(Fail::new(errno::EPERM, "the export is read-only"));
        }
        let fua = req.flags & cflag::FUA != 0;
        match req.cmd {
            cmd::READ => self.read(req),
            cmd::WRITE => {
                self.in_range(req)
                    .ok_or_else(|| Fail::new(errno::ENOSPC, "write past the end of the export"))?;
                self.img
                    .write_at(&self.buf[..req.len as usize], req.offset)?;
                self.fua(fua)
            }
            cmd::FLUSH => {
                self.img.flush()?;
                Ok(Done::Simple)
            }
            cmd::TRIM => {
                self.in_range(req)
                    .ok_or_else(|| Fail::new(errno::ENOSPC, "trim past the end of the export"))?;
                if self.cfg.discard && req.len > 0 {
                    self.img.discard(req.offset, u64::from(req.len))?;
                }
                self.fua(fua)
            }
            cmd::WRITE_ZEROES => {
                let end = self.in_range(req).ok_or_else(|| {
                    Fail::new(errno::ENOSPC, "write zeroes past the end of the export")
                })?;
                if req.len == 0 {
                    return Ok(Done::Simple);
                }
                if req.flags & cflag::FAST_ZERO != 0 {
                    // Whole clusters become zero clusters in metadata; a
                    // partial cluster would be written with data.
                    let cs = self.img.cluster_size();
                    let fast = req.offset.is_multiple_of(cs) && (end % cs == 0 || end == self.size);
                    if !fast {
                        return Err(Fail::new(errno::ENOTSUP, "zeroing would not be fast"));
                    }
                }
                let unmap = req.flags & cflag::NO_HOLE == 0;
                self.img
                    .write_zeroes(req.offset, u64::from(req.len), unmap)?;
                self.fua(fua)
            }
            cmd::CACHE => {
                self.in_range(req)
                    .ok_or_else(|| Fail::new(errno::EINVAL, "cache past the end of the export"))?;
                Ok(Done::Simple)
            }
            _ => self.block_status(req),
        }
    }

    fn fua(&self, fua: bool) -> Result<Done, Fail> {
        if fua {
            self.img.flush()?;
        }
        Ok(Done::Simple)
    }

    fn read(&mut self, req: &Request) -> Result<Done, Fail> {
        if req.len > proto::MAX_PAYLOAD {
            let e = if self.structured {
                errno::EOVERFLOW
            } else {
                errno::EINVAL
            };
            return Err(Fail::new(
                e,
                "request length exceeds the maximum block size",
            ));
        }
        self.in_range(req)
            .ok_or_else(|| Fail::new(errno::EINVAL, "read past the end of the export"))?;
        let len = req.len as usize;
        if !self.structured {
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            buf.resize(len, 0);
            let r = self.img.read_at(&mut buf, req.offset);
            let sent = match r {
                Ok(()) => self
                    .send(&proto::encode_simple_reply(0, req.cookie))
                    .and_then(|_| self.send(&buf)),
                Err(e) => {
                    self.buf = buf;
                    return Err(e.into());
                }
            };
            self.buf = buf;
            return sent.map(|_| Done::Replied).map_err(Self::lost);
        }
        // Structured: holes (runs reading as zeroes) are sent as
        // OFFSET_HOLE, unless the client asked for one unfragmented chunk.
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        if req.flags & cflag::DF != 0 || len == 0 {
            runs.push((req.offset, len as u64, false));
        } else {
            let end = req.offset + len as u64;
            let mut pos = req.offset;
            while pos < end {
                let st = status::chain_status(self.img, pos, end - pos)?;
                let hole = st.zero && !st.data;
                match runs.last_mut() {
                    Some(last) if last.2 == hole => last.1 += st.len,
                    _ => runs.push((pos, st.len, hole)),
                }
                pos += st.len;
            }
        }
        let n = runs.len();
        for (i, (off, rlen, hole)) in runs.into_iter().enumerate() {
            let flags = if i + 1 == n {
                proto::chunk::FLAG_DONE
            } else {
                0
            };
            let rlen32 = u32::try_from(rlen).unwrap_or(u32::MAX);
            if hole {
                self.send(&proto::encode_hole_chunk(flags, req.cookie, off, rlen32))
                    .map_err(Self::lost)?;
                continue;
            }
            let mut buf = std::mem::take(&mut self.buf);
            buf.clear();
            buf.resize(rlen as usize, 0);
            if let Err(e) = self.img.read_at(&mut buf, off) {
                self.buf = buf;
                return Err(e.into());
            }
            let r = self
                .send(&proto::encode_data_chunk_header(
                    flags, req.cookie, off, rlen32,
                ))
                .and_then(|_| self.send(&buf));
            self.buf = buf;
            r.map_err(Self::lost)?;
        }
        Ok(Done::Replied)
    }

    fn block_status(&mut self, req: &Request) -> Result<Done, Fail> {
        if !self.structured || self.contexts.is_empty() {
            return Err(Fail::new(
                errno::EINVAL,
                "no metadata context was negotiated",
            ));
        }
        if req.len == 0 {
            return Err(Fail::new(errno::EINVAL, "block status of no bytes"));
        }
        self.in_range(req)
            .ok_or_else(|| Fail::new(errno::EINVAL, "block status past the end of the export"))?;
        let one = req.flags & cflag::REQ_ONE != 0;
        let mut chunks = Vec::with_capacity(self.contexts.len());
        for c in self.contexts.clone() {
            let ext = status::extents(self.img, req.offset, req.len, one, c, &self.cfg.bitmaps)?;
            chunks.push((c, ext));
        }
        let n = chunks.len();
        for (i, (c, ext)) in chunks.iter().enumerate() {
            let flags = if i + 1 == n {
                proto::chunk::FLAG_DONE
            } else {
                0
            };
            let b = proto::encode_block_status_chunk(flags, req.cookie, c.id(), ext);
            self.send(&b).map_err(Self::lost)?;
        }
        Ok(Done::Replied)
    }

    /// A reply could not be sent: the connection is gone; the caller's
    /// next read notices it.
    fn lost(_: End) -> Fail {
        Fail::new(errno::EIO, "connection lost")
    }
}

/// What to do after an option.
enum OptNext {
    More,
    Transmission,
    Abort,
}

/// How a request was answered.
enum Done {
    /// The reply was sent (reads and block status).
    Replied,
    /// Success: send a simple reply.
    Simple,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemStorage, Storage};
    use crate::{CreateOptions, OpenOptions};
    use std::sync::Arc;

    /// A client that sends `input` and then closes; replies are counted.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        replied: usize,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.replied += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn option(v: &mut Vec<u8>, o: u32, data: &[u8]) {
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
    }

    /// A valid handshake up to transmission, with both contexts set.
    fn handshake() -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        option(&mut v, opt::STRUCTURED_REPLY, &[]);
        let mut meta = 0u32.to_be_bytes().to_vec();
        meta.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:allocation-depth"] {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        option(&mut v, opt::SET_META_CONTEXT, &meta);
        option(&mut v, opt::GO, &[0, 0, 0, 0, 0, 0]);
        v
    }

    /// Random options and requests (well-formed headers with random
    /// fields, and random bytes) never panic the server, and the image
    /// stays usable.
    #[test]
    fn random_input_never_panics() {
        let file: Arc<dyn Storage> = Arc::new(MemStorage::new());
        crate::create::create_on(file.clone(), &CreateOptions::new(), 4 << 20).expect("create");
        let img = Image::open_storage(file, &OpenOptions::new()).expect("open");
        let cfg = ExportConfig {
            name: String::new(),
            discard: true,
            multi_conn: true,
            bitmaps: Vec::new(),
        };
        let stop = AtomicBool::new(false);
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for round in 0..400 {
            let mut v = if round % 4 == 0 {
                3u32.to_be_bytes().to_vec()
            } else {
                handshake()
            };
            for _ in 0..(rng.next() % 8) {
                let r = rng.next();
                if round % 4 == 0 {
                    let data: Vec<u8> = (0..r % 64).map(|_| rng.next() as u8).collect();
                    option(&mut v, (r >> 8) as u32 % 12, &data);
                    continue;
                }
                let cmd = (r >> 8) as u16 % 10;
                let len = match r % 4 {
                    0 => (rng.next() % 70_000) as u32,
                    1 => rng.next() as u32,
                    _ => (rng.next() % 4096) as u32,
                };
                let offset = match (r >> 4) % 3 {
                    0 => rng.next() % (5 << 20),
                    1 => rng.next(),
                    _ => (rng.next() % 64) << 16,
                };
                let req = Request {
                    flags: if r.is_multiple_of(3) {
                        (rng.next() % 64) as u16
                    } else {
                        0
                    },
                    cmd,
                    cookie: r,
                    offset,
                    len,
                };
                v.extend_from_slice(&proto::encode_request(&req));
                if cmd == cmd::WRITE && len <= 70_000 {
                    v.extend((0..len).map(|i| i as u8));
                }
                if r.is_multiple_of(17) {
                    // Garbage in the middle of the stream.
                    v.extend((0..(r % 40)).map(|_| rng.next() as u8));
                }
            }
            let mut s = Script {
                input: io::Cursor::new(v),
                replied: 0,
            };
            let _ = Conn::new(&mut s, &img, &cfg, &stop).run();
            assert!(s.replied >= 18, "the greeting is always sent");
        }
        // Some random writes got through, and the image still works.
        let mut buf = vec![0u8; 4 << 20];
        img.read_at(&mut buf, 0).expect("image still readable");
        assert!(buf.iter().any(|&b| b != 0), "no request reached the image");
        img.flush().expect("image still flushes");
    }
}
