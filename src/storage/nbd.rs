//! `nbd`: an NBD client storage (fixed newstyle handshake, `NBD_OPT_GO`, structured
//! replies when the server offers them).

use super::backend::BackendSpec;
use super::Storage;
use crate::error::strerror;
use crate::export::nbd::proto::{self, chunk, cmd, info, opt, rep, tflag};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// The largest payload of one request; longer I/O is split.
const MAX_REQUEST: usize = 4 << 20;
/// The largest option reply or error chunk accepted from the server.
const MAX_REPLY: usize = 64 << 10;

/// Where the server listens (`server.type`, `server.path` / `server.host`, `server.port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    /// `server.type=unix,server.path=PATH`.
    Unix(String),
    /// `server.type=inet,server.host=HOST,server.port=PORT` (port default 10809).
    Inet(String, String),
}

/// The options of one `nbd` node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// The server address.
    pub server: NbdServer,
    /// `export` (default: the empty name).
    pub export: String,
}

impl NbdConfig {
    /// Parses the `nbd` options of `spec` (QEMU's texts on error); `filename` may be an
    /// `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT` URI.
    ///
    /// # Errors
    /// QEMU's message for a missing or bad option.
    pub fn parse(spec: &BackendSpec) -> Result<NbdConfig, String> {
        let mut ty = None;
        let (mut path, mut host, mut port, mut export) = (None, None, None, None);
        for (k, v) in &spec.options {
            match k.as_str() {
                "server.type" => ty = Some(v.clone()),
                "server.path" => path = Some(v.clone()),
                "server.host" => host = Some(v.clone()),
                "server.port" => port = Some(v.clone()),
                "export" => export = Some(v.clone()),
                "filename" => return parse_uri(v),
                "tls-creds" => return Err("TLS is not supported by this NBD client".into()),
                "node-name" | "read-only" | "reconnect-delay" | "open-timeout" => {}
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        let server = match ty.as_deref() {
            None => return Err("Parameter 'type' is missing".into()),
            Some("unix") => NbdServer::Unix(path.ok_or("Parameter 'path' is missing")?),
            Some("inet") => NbdServer::Inet(
                host.ok_or("Parameter 'host' is missing")?,
                port.unwrap_or_else(|| "10809".into()),
            ),
            Some(other) => return Err(format!("Parameter 'type' does not accept value '{other}'")),
        };
        Ok(NbdConfig {
            server,
            export: export.unwrap_or_default(),
        })
    }
}

fn parse_uri(uri: &str) -> Result<NbdConfig, String> {
    let bad = || format!("Invalid NBD URI '{uri}'");
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path_part, query) = rest.split_once('?').ok_or_else(bad)?;
        let socket = query.strip_prefix("socket=").ok_or_else(bad)?;
        Ok(NbdConfig {
            server: NbdServer::Unix(socket.to_owned()),
            export: path_part.trim_start_matches('/').to_owned(),
        })
    } else if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
        Ok(NbdConfig {
            server: NbdServer::Inet(host.to_owned(), port.to_owned()),
            export: export.to_owned(),
        })
    } else {
        Err(bad())
    }
}

trait Stream: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> Stream for T {}

/// A storage on an NBD export. One connection; requests are sent one at a time.
/// The export has a fixed size: writes past it fail with EINVAL (as QEMU's client);
/// reads past it read zeroes.
#[derive(Debug)]
pub struct NbdStorage {
    conn: Mutex<Conn>,
    size: u64,
    flags: u16,
    structured: bool,
}

#[derive(Debug)]
struct Conn {
    stream: Box<dyn Stream>,
    cookie: u64,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

fn protocol(what: &str) -> io::Error {
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
    io::copy(&mut (&mut *s).take(n), &mut io::sink())?;
    Ok(())
}

/// The NBD error number from the wire mapped to the local errno (the values are Linux's).
fn nbd_errno(e: u32) -> io::Error {
    let code = match e {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => e as i32,
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(code)
}

fn send_option(s: &mut dyn Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// One option reply: (type, payload).
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

impl NbdStorage {
    /// Connects, negotiates and opens the export of `cfg`.
    ///
    /// # Errors
    /// QEMU's text: `Failed to connect to 'PATH': ...`, or the server's refusal.
    pub fn connect(cfg: &NbdConfig) -> Result<NbdStorage, String> {
        let mut stream: Box<dyn Stream> = match &cfg.server {
            NbdServer::Unix(p) => Box::new(UnixStream::connect(p).map_err(|e| {
                format!(
                    "Failed to connect to '{p}': {}",
                    strerror(e.raw_os_error().unwrap_or(libc::EIO))
                )
            })?),
            NbdServer::Inet(h, port) => {
                let addr = format!("{h}:{port}");
                let s = TcpStream::connect(&addr).map_err(|e| {
                    format!(
                        "Failed to connect to '{addr}': {}",
                        strerror(e.raw_os_error().unwrap_or(libc::EIO))
                    )
                })?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        };
        Self::handshake(&mut *stream, &cfg.export)
            .map(|(size, flags, structured)| NbdStorage {
                conn: Mutex::new(Conn { stream, cookie: 1 }),
                size,
                flags,
                structured,
            })
            .map_err(|e| e.to_string())
    }

    fn handshake(s: &mut dyn Stream, export: &str) -> io::Result<(u64, u16, bool)> {
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
        let mut go = Vec::new();
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        send_option(s, opt::GO, &go)?;
        let mut export_info = None;
        loop {
            let (ty, data) = read_option_reply(s, opt::GO)?;
            match ty {
                rep::ACK => break,
                rep::INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == info::EXPORT =>
                {
                    let mut sz = [0; 8];
                    sz.copy_from_slice(&data[2..10]);
                    export_info = Some((
                        u64::from_be_bytes(sz),
                        u16::from_be_bytes([data[10], data[11]]),
                    ));
                }
                t if t & (1 << 31) != 0 => {
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    return Err(io::Error::other(if msg.is_empty() {
                        "Requested export not available".to_owned()
                    } else {
                        msg
                    }));
                }
                _ => {}
            }
        }
        let (size, flags) = export_info.ok_or_else(|| protocol("no export information"))?;
        Ok((size, flags, structured))
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// One request; `out` is the write payload, `into` the read buffer.
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        out: &[u8],
        into: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let mut c = self
            .conn
            .lock()
            .map_err(|_| io::Error::other("NBD lock poisoned"))?;
        let cookie = c.cookie;
        c.cookie = c.cookie.wrapping_add(1);
        let mut m = Vec::with_capacity(28 + out.len());
        m.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(out);
        let s = &mut *c.stream;
        s.write_all(&m)?;
        let magic = read_u32(s)?;
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let err = read_u32(s)?;
            if read_u64(s)? != cookie {
                return Err(protocol("reply for another request"));
            }
            if err != 0 {
                return Err(nbd_errno(err));
            }
            if let Some(buf) = into {
                s.read_exact(buf)?;
            }
            return Ok(());
        }
        if magic != proto::STRUCTURED_REPLY_MAGIC || !self.structured {
            return Err(protocol("bad reply magic"));
        }
        let mut into = into;
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
            match ty {
                chunk::NONE => {}
                chunk::OFFSET_DATA | chunk::OFFSET_HOLE => {
                    let Some(buf) = into.as_deref_mut() else {
                        return Err(protocol("data chunk for a non-read"));
                    };
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
                    let part = &mut buf[rel as usize..(rel + n) as usize];
                    if hole {
                        part.fill(0);
                    } else {
                        s.read_exact(part)?;
                    }
                }
                t if t & (1 << 15) != 0 => {
                    if !(6..=MAX_REPLY as u64).contains(&clen) {
                        return Err(protocol("bad error chunk"));
                    }
                    let e = read_u32(s)?;
                    skip(s, clen - 4)?;
                    error.get_or_insert(e);
                }
                _ => skip(s, clen.min(MAX_REPLY as u64 + MAX_REQUEST as u64))?,
            }
            if cflags & chunk::FLAG_DONE != 0 {
                break;
            }
        }
        match error {
            Some(e) => Err(nbd_errno(e)),
            None => Ok(()),
        }
    }
}

impl Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let avail = usize::try_from(self.size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        buf[avail..].fill(0);
        let mut done = 0;
        while done < avail {
            let n = (avail - done).min(MAX_REQUEST);
            let at = offset + done as u64;
            self.request(
                cmd::READ,
                0,
                at,
                n as u32,
                &[],
                Some(&mut buf[done..done + n]),
            )?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).ok_or_else(eio)?;
        if end > self.size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.flags & tflag::READ_ONLY != 0 {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        for (i, part) in buf.chunks(MAX_REQUEST).enumerate() {
            let at = offset + (i * MAX_REQUEST) as u64;
            self.request(cmd::WRITE, 0, at, part.len() as u32, part, None)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(cmd::FLUSH, 0, 0, 0, &[], None)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        let zeroes = self.flags & tflag::SEND_WRITE_ZEROES != 0;
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(1 << 30);
            // The range must read as zeroes afterwards, which TRIM does not promise:
            // WRITE_ZEROES when the server has it, else plain writes of zeroes.
            if zeroes {
                self.request(cmd::WRITE_ZEROES, 0, pos, n as u32, &[], None)?;
            } else {
                let z = vec![0u8; n.min(MAX_REQUEST as u64) as usize];
                let mut p = pos;
                while p < pos + n {
                    let k = (pos + n - p).min(z.len() as u64) as usize;
                    self.write_at(&z[..k], p)?;
                    p += k as u64;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        if let Ok(mut c) = self.conn.lock() {
            let mut m = Vec::with_capacity(28);
            m.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&cmd::DISC.to_be_bytes());
            m.extend_from_slice(&0u64.to_be_bytes());
            m.extend_from_slice(&0u64.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            let _ = c.stream.write_all(&m);
        }
    }
}
