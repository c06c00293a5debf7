//! One NBD connection: the fixed newstyle handshake (structured replies, the
//! `base:allocation` meta context, `NBD_OPT_GO`) and one request/reply exchange.
//!
//! Everything the server sends is untrusted: every length is checked against the
//! request or a fixed bound before anything is allocated or read into a buffer.

use crate::export::nbd::proto::{self, alloc, chunk, info, opt, rep};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The largest option reply or error chunk accepted from the server.
pub(super) const MAX_REPLY: usize = 64 << 10;
/// The most extents accepted in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the
/// chunk is read into memory: at most 4 + 8 * this many bytes).
pub(super) const MAX_STATUS_EXTENTS: usize = 1 << 16;
/// The most option replies accepted for one option (`NBD_REP_INFO` etc.).
const MAX_OPTION_REPLIES: usize = 1024;
/// The meta context asked for with `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION: &str = "base:allocation";

/// A byte stream to the server whose blocking reads and writes can time out.
pub(super) trait Stream: Read + Write + Send + std::fmt::Debug {
    /// Sets the read and write timeout (`None`: block forever).
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Stream for UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl Stream for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// What a request's reply is read into.
pub(super) enum Reply<'a> {
    /// No payload (write, flush, write-zeroes).
    None,
    /// A read: the whole buffer is filled (data and hole chunks must cover it).
    Read(&'a mut [u8]),
    /// A block status request: `(length, NBD_STATE_* flags)` of the
    /// `base:allocation` context, clipped to the request.
    Status(&'a mut Vec<(u32, u32)>),
}

/// One open connection, negotiated.
#[derive(Debug)]
pub(super) struct Conn {
    stream: Box<dyn Stream>,
    cookie: u64,
    structured: bool,
    /// The server's id of `base:allocation`, when it agreed to the context.
    pub(super) base_allocation: Option<u32>,
    /// Export size and transmission flags from `NBD_INFO_EXPORT`.
    pub(super) size: u64,
    pub(super) flags: u16,
}

pub(super) fn protocol(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("NBD protocol error: {what}"),
    )
}

fn read_u16(s: &mut dyn Stream) -> io::Result<u16> {
    let mut b = [0; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut dyn Stream) -> io::Result<u32> {
    let mut b = [0; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut dyn Stream) -> io::Result<u64> {
    let mut b = [0; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn skip(s: &mut dyn Stream, n: u64) -> io::Result<()> {
    let got = io::copy(&mut (&mut *s).take(n), &mut io::sink())?;
    if got == n {
        Ok(())
    } else {
        Err(io::ErrorKind::UnexpectedEof.into())
    }
}

/// The NBD error number from the wire mapped to the local errno (the values are Linux's).
pub(super) fn nbd_errno(e: u32) -> io::Error {
    let code = match e {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => e as i32,
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

fn send_option(s: &mut dyn Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| protocol("option too long"))?;
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: (type, payload). The payload is bounded by [`MAX_REPLY`].
fn read_option_reply(s: &mut dyn Stream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(s)? != proto::OPT_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    if read_u32(s)? != option {
        return Err(protocol("option reply for another option"));
    }
    let ty = read_u32(s)?;
    let len = read_u32(s)? as usize;
    if len > MAX_REPLY {
        return Err(protocol("option reply too long"));
    }
    let mut data = vec![0; len];
    s.read_exact(&mut data)?;
    Ok((ty, data))
}

fn put_string(m: &mut Vec<u8>, s: &str) -> io::Result<()> {
    let len = u32::try_from(s.len()).map_err(|_| protocol("string too long"))?;
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(s.as_bytes());
    Ok(())
}

/// An error from the server (a refused option or a failed request): the
/// connection itself is fine.
#[derive(Debug)]
pub(super) struct ServerError(pub(super) io::Error);

impl Conn {
    /// Negotiates `export` on a freshly connected `stream` (with `timeout` on
    /// every read and write, also later requests).
    ///
    /// # Errors
    /// The outer error: the connection broke or the server broke the protocol;
    /// the inner one: the server refused the export.
    pub(super) fn handshake(
        mut stream: Box<dyn Stream>,
        export: &str,
        timeout: Option<Duration>,
    ) -> io::Result<Result<Conn, ServerError>> {
        stream.set_timeouts(timeout)?;
        let s = &mut *stream;
        if read_u64(s)? != proto::NBD_MAGIC || read_u64(s)? != proto::IHAVEOPT {
            return Err(protocol("server is not a newstyle NBD server"));
        }
        let hflags = read_u16(s)?;
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol("server does not support fixed newstyle"));
        }
        let mut cflags = proto::CLIENT_FIXED_NEWSTYLE;
        if hflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::CLIENT_NO_ZEROES;
        }
        s.write_all(&cflags.to_be_bytes())?;
        send_option(s, opt::STRUCTURED_REPLY, &[])?;
        let (ty, _) = read_option_reply(s, opt::STRUCTURED_REPLY)?;
        let structured = ty == rep::ACK;
        // base:allocation needs structured replies (its answer is a chunk).
        let base_allocation = if structured {
            Self::set_meta_context(s, export)?
        } else {
            None
        };
        let mut go = Vec::new();
        put_string(&mut go, export)?;
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(s, opt::GO, &go)?;
        let mut export_info = None;
        let mut replies = 0;
        loop {
            replies += 1;
            if replies > MAX_OPTION_REPLIES {
                return Err(protocol("too many option replies"));
            }
            let (ty, data) = read_option_reply(s, opt::GO)?;
            match ty {
                rep::ACK => break,
                rep::INFO if data.len() >= 12 && be16(&data[0..2]) == info::EXPORT => {
                    let mut sz = [0; 8];
                    sz.copy_from_slice(&data[2..10]);
                    export_info = Some((u64::from_be_bytes(sz), be16(&data[10..12])));
                }
                t if t & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Ok(Err(ServerError(io::Error::other(if msg.is_empty() {
                        "Requested export not available".to_owned()
                    } else {
                        msg
                    }))));
                }
                _ => {}
            }
        }
        let (size, flags) = export_info.ok_or_else(|| protocol("no export information"))?;
        Ok(Ok(Conn {
            stream,
            cookie: 1,
            structured,
            base_allocation,
            size,
            flags,
        }))
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: the context id, or
    /// `None` when the server does not offer it.
    fn set_meta_context(s: &mut dyn Stream, export: &str) -> io::Result<Option<u32>> {
        let mut m = Vec::new();
        put_string(&mut m, export)?;
        m.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut m, BASE_ALLOCATION)?;
        send_option(s, opt::SET_META_CONTEXT, &m)?;
        let mut id = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let (ty, data) = read_option_reply(s, opt::SET_META_CONTEXT)?;
            match ty {
                rep::ACK => return Ok(id),
                rep::META_CONTEXT => {
                    if data.len() < 4 {
                        return Err(protocol("short meta context reply"));
                    }
                    if &data[4..] == BASE_ALLOCATION.as_bytes() {
                        id = Some(be32(&data[0..4]));
                    } else {
                        return Err(protocol("meta context that was not asked for"));
                    }
                }
                // Unsupported or refused: no block status, as in QEMU.
                t if t & (1 << 31) != 0 => return Ok(None),
                _ => {}
            }
        }
        Err(protocol("too many option replies"))
    }

    /// Sends `NBD_CMD_DISC` (best effort).
    pub(super) fn disconnect(&mut self) {
        let mut m = Vec::with_capacity(28);
        m.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&proto::cmd::DISC.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&0u32.to_be_bytes());
        let _ = self.stream.write_all(&m);
    }

    /// One request and its whole reply. `out` is the write payload.
    ///
    /// # Errors
    /// The outer error: the connection broke, timed out or the server broke the
    /// protocol (the connection is unusable); the inner one: the server's error
    /// reply to this request (the connection is fine).
    pub(super) fn exchange(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        out: &[u8],
        mut reply: Reply<'_>,
    ) -> io::Result<Result<(), ServerError>> {
        let cookie = self.cookie;
        self.cookie = self.cookie.wrapping_add(1);
        let mut m = Vec::with_capacity(28 + out.len());
        m.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(out);
        let s = &mut *self.stream;
        s.write_all(&m)?;
        let magic = read_u32(s)?;
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let err = read_u32(s)?;
            if read_u64(s)? != cookie {
                return Err(protocol("reply for another request"));
            }
            if err != 0 {
                return Ok(Err(ServerError(nbd_errno(err))));
            }
            match reply {
                Reply::Read(buf) => s.read_exact(buf)?,
                Reply::Status(_) => return Err(protocol("simple reply to block status")),
                Reply::None => {}
            }
            return Ok(Ok(()));
        }
        if magic != proto::STRUCTURED_REPLY_MAGIC || !self.structured {
            return Err(protocol("bad reply magic"));
        }
        if let Reply::Read(buf) = &mut reply {
            // Whatever the chunks do not cover must not leak the caller's bytes.
            buf.fill(0);
        }
        let mut covered = 0u64;
        let mut status_seen = false;
        let mut error = None;
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) && read_u32(s)? != proto::STRUCTURED_REPLY_MAGIC {
                return Err(protocol("bad reply magic"));
            }
            let cflags = read_u16(s)?;
            let ty = read_u16(s)?;
            if read_u64(s)? != cookie {
                return Err(protocol("reply for another request"));
            }
            let clen = u64::from(read_u32(s)?);
            match (ty, &mut reply) {
                (chunk::NONE, _) => {
                    if clen != 0 {
                        return Err(protocol("bad none chunk"));
                    }
                }
                (chunk::OFFSET_DATA | chunk::OFFSET_HOLE, Reply::Read(buf)) => {
                    if clen < 8 {
                        return Err(protocol("short chunk"));
                    }
                    let at = read_u64(s)?;
                    let (n, hole) = if ty == chunk::OFFSET_DATA {
                        (clen - 8, false)
                    } else {
                        if clen != 12 {
                            return Err(protocol("bad hole chunk"));
                        }
                        (u64::from(read_u32(s)?), true)
                    };
                    let rel = at
                        .checked_sub(offset)
                        .filter(|r| r.checked_add(n).is_some_and(|e| e <= buf.len() as u64))
                        .ok_or_else(|| protocol("chunk outside the request"))?;
                    // In bounds of `buf` (checked above), so these fit in usize.
                    let part = &mut buf[rel as usize..(rel + n) as usize];
                    if hole {
                        part.fill(0);
                    } else {
                        s.read_exact(part)?;
                    }
                    covered += n;
                }
                (chunk::BLOCK_STATUS, Reply::Status(out)) => {
                    if clen < 12 || (clen - 4) % 8 != 0 || clen > 4 + 8 * MAX_STATUS_EXTENTS as u64
                    {
                        return Err(protocol("bad block status chunk"));
                    }
                    let mut data = vec![0u8; clen as usize];
                    s.read_exact(&mut data)?;
                    if Some(be32(&data[0..4])) != self.base_allocation {
                        return Err(protocol("block status for an unknown context"));
                    }
                    if std::mem::replace(&mut status_seen, true) {
                        return Err(protocol("duplicate block status chunk"));
                    }
                    let mut left = u64::from(len);
                    for e in data[4..].chunks_exact(8) {
                        let (elen, eflags) = (be32(&e[0..4]), be32(&e[4..8]));
                        if elen == 0 {
                            return Err(protocol("empty block status extent"));
                        }
                        if left == 0 {
                            break;
                        }
                        let n = u64::from(elen).min(left);
                        // n <= len, a u32.
                        out.push((n as u32, eflags & (alloc::HOLE | alloc::ZERO)));
                        left -= n;
                    }
                }
                (t, _) if t & (1 << 15) != 0 => {
                    if !(6..=MAX_REPLY as u64).contains(&clen) {
                        return Err(protocol("bad error chunk"));
                    }
                    let e = read_u32(s)?;
                    skip(s, clen - 4)?;
                    error.get_or_insert(e);
                }
                _ => return Err(protocol("unexpected reply chunk")),
            }
            if cflags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Ok(Err(ServerError(nbd_errno(e))));
        }
        match reply {
            Reply::Read(buf) if covered != buf.len() as u64 => {
                Err(protocol("read reply does not cover the request"))
            }
            Reply::Status(_) if !status_seen => Err(protocol("no block status in the reply")),
            _ => Ok(Ok(())),
        }
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::export::nbd::proto::tflag;

    fn opt_reply(s: &mut UnixStream, option: u32, ty: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// Reads one option from the client: (option, payload).
    fn read_opt(s: &mut UnixStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let len = be32(&h[12..16]) as usize;
        let mut d = vec![0; len];
        s.read_exact(&mut d).unwrap();
        (be32(&h[8..12]), d)
    }

    /// A fake server: the handshake with `base:allocation` (id 7), then
    /// `after` runs on the socket.
    fn fake(after: impl FnOnce(&mut UnixStream) + Send + 'static) -> Box<dyn Stream> {
        let (client, mut srv) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            serve_handshake(&mut srv);
            after(&mut srv);
        });
        Box::new(client)
    }

    /// The server side of the handshake (export of 1 MiB, `base:allocation` = 7).
    fn serve_handshake(srv: &mut UnixStream) {
        {
            let mut g = Vec::new();
            g.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
            g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            g.extend_from_slice(
                &(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes(),
            );
            srv.write_all(&g).unwrap();
            let mut cf = [0u8; 4];
            srv.read_exact(&mut cf).unwrap();
            assert_eq!(read_opt(srv).0, opt::STRUCTURED_REPLY);
            opt_reply(srv, opt::STRUCTURED_REPLY, rep::ACK, &[]);
            assert_eq!(read_opt(srv).0, opt::SET_META_CONTEXT);
            let mut mc = 7u32.to_be_bytes().to_vec();
            mc.extend_from_slice(BASE_ALLOCATION.as_bytes());
            opt_reply(srv, opt::SET_META_CONTEXT, rep::META_CONTEXT, &mc);
            opt_reply(srv, opt::SET_META_CONTEXT, rep::ACK, &[]);
            assert_eq!(read_opt(srv).0, opt::GO);
            let mut inf = info::EXPORT.to_be_bytes().to_vec();
            inf.extend_from_slice(&(1u64 << 20).to_be_bytes());
            inf.extend_from_slice(&(tflag::HAS_FLAGS | tflag::SEND_FLUSH).to_be_bytes());
            opt_reply(srv, opt::GO, rep::INFO, &inf);
            opt_reply(srv, opt::GO, rep::ACK, &[]);
        }
    }

    /// A structured chunk header for the request with cookie 1.
    fn chunk_header(s: &mut UnixStream, flags: u16, ty: u16, len: u32) {
        let mut req = [0u8; 28];
        s.read_exact(&mut req).unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&ty.to_be_bytes());
        m.extend_from_slice(&req[8..16]);
        m.extend_from_slice(&len.to_be_bytes());
        s.write_all(&m).unwrap();
    }

    #[test]
    fn block_status_extents_are_clipped_to_the_request() {
        let stream = fake(|s| {
            chunk_header(s, chunk::FLAG_DONE, chunk::BLOCK_STATUS, 4 + 16);
            let mut m = 7u32.to_be_bytes().to_vec();
            for (len, flags) in [(4096u32, 0u32), (1 << 20, alloc::HOLE | alloc::ZERO)] {
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&flags.to_be_bytes());
            }
            s.write_all(&m).unwrap();
        });
        let mut c = Conn::handshake(stream, "", None).unwrap().unwrap();
        assert_eq!((c.size, c.base_allocation), (1 << 20, Some(7)));
        let mut ext = Vec::new();
        c.exchange(
            proto::cmd::BLOCK_STATUS,
            0,
            0,
            65536,
            &[],
            Reply::Status(&mut ext),
        )
        .unwrap()
        .unwrap();
        assert_eq!(ext, [(4096, 0), (61440, alloc::HOLE | alloc::ZERO)]);
    }

    /// Lengths from the server are checked before anything is allocated: a
    /// block status chunk claiming 4 GiB, an option reply claiming 4 GiB, a
    /// data chunk outside the request.
    #[test]
    fn oversized_replies_are_protocol_errors_not_allocations() {
        let stream = fake(|s| chunk_header(s, chunk::FLAG_DONE, chunk::BLOCK_STATUS, u32::MAX - 3));
        let mut c = Conn::handshake(stream, "", None).unwrap().unwrap();
        let mut ext = Vec::new();
        let e = c
            .exchange(
                proto::cmd::BLOCK_STATUS,
                0,
                0,
                4096,
                &[],
                Reply::Status(&mut ext),
            )
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let stream = fake(|s| {
            chunk_header(s, chunk::FLAG_DONE, chunk::OFFSET_DATA, 8 + 8192);
            s.write_all(&0u64.to_be_bytes()).unwrap();
        });
        let mut c = Conn::handshake(stream, "", None).unwrap().unwrap();
        let mut buf = [0u8; 4096];
        let e = c
            .exchange(proto::cmd::READ, 0, 0, 4096, &[], Reply::Read(&mut buf))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        let (client, mut srv) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut g = Vec::new();
            g.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
            g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&proto::FLAG_FIXED_NEWSTYLE.to_be_bytes());
            srv.write_all(&g).unwrap();
            let mut cf = [0u8; 4];
            srv.read_exact(&mut cf).unwrap();
            read_opt(&mut srv);
            let mut m = Vec::new();
            m.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
            m.extend_from_slice(&opt::STRUCTURED_REPLY.to_be_bytes());
            m.extend_from_slice(&rep::ACK.to_be_bytes());
            m.extend_from_slice(&u32::MAX.to_be_bytes());
            let _ = srv.write_all(&m);
        });
        let e = Conn::handshake(Box::new(client), "", None).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    /// A request in flight when the connection breaks is sent again on the next
    /// connection within `reconnect-delay`; without a delay it fails with EIO.
    #[test]
    fn in_flight_request_is_resent_after_a_reconnect() {
        use super::super::{NbdConfig, NbdServer, NbdStorage};
        use crate::storage::Storage;
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: take the read, then drop the connection unanswered.
            let (mut a, _) = listener.accept().unwrap();
            serve_handshake(&mut a);
            let mut req = [0u8; 28];
            a.read_exact(&mut req).unwrap();
            drop(a);
            // Second connection: answer the same read.
            let (mut b, _) = listener.accept().unwrap();
            serve_handshake(&mut b);
            b.read_exact(&mut req).unwrap();
            assert_eq!(&req[6..8], &proto::cmd::READ.to_be_bytes());
            let mut m = Vec::new();
            m.extend_from_slice(&proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            m.extend_from_slice(&req[8..16]);
            m.extend_from_slice(&[0x42; 512]);
            b.write_all(&m).unwrap();
            // Third connection (the storage without a delay): drop the read.
            let (mut c, _) = listener.accept().unwrap();
            serve_handshake(&mut c);
            let _ = c.read_exact(&mut req);
        });
        let mut cfg = NbdConfig {
            server: NbdServer::Unix(sock.display().to_string()),
            export: String::new(),
            reconnect_delay: Duration::from_secs(60),
            open_timeout: Duration::ZERO,
            request_timeout: None,
        };
        let s = NbdStorage::connect(&cfg).unwrap();
        let mut buf = [0u8; 512];
        s.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0x42; 512]);
        assert_eq!(s.reconnects(), 1);
        drop(s);
        cfg.reconnect_delay = Duration::ZERO;
        let s = NbdStorage::connect(&cfg).unwrap();
        let e = s.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        server.join().unwrap();
    }
}
