//! `nbd`: an NBD client storage (fixed newstyle handshake, `NBD_OPT_GO`, structured
//! replies and the `base:allocation` meta context when the server offers them,
//! reconnect after a broken connection, request timeouts).

mod conn;

use self::conn::{Conn, Reply, ServerError, Stream};
use super::backend::BackendSpec;
use super::Storage;
use crate::error::strerror;
use crate::export::nbd::proto::{alloc, cmd, tflag};
use crate::options::parse::parse_number;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The largest payload of one request; longer I/O is split.
const MAX_REQUEST: usize = 4 << 20;

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
    /// `reconnect-delay` (QEMU's, in seconds, default 0): how long requests wait
    /// for a reconnect after the connection broke before they fail (see
    /// [`NbdStorage`]).
    pub reconnect_delay: Duration,
    /// `open-timeout` (QEMU's, in seconds, default 0): how long opening keeps
    /// trying to connect; 0 tries once.
    pub open_timeout: Duration,
    /// `request-timeout` (ours, in seconds; QEMU has no such option; default 0 =
    /// none): a reply (or the handshake of a reconnect) that takes longer breaks
    /// the connection, which is then handled as any other break (reconnect within
    /// `reconnect-delay`, else EIO).
    pub request_timeout: Option<Duration>,
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
        let mut uri = None;
        let (mut reconnect, mut open, mut request) = (0, 0, 0);
        let secs = |k: &str, v: &str| parse_number(k, v).map_err(|e| e.to_string());
        for (k, v) in &spec.options {
            match k.as_str() {
                "server.type" => ty = Some(v.clone()),
                "server.path" => path = Some(v.clone()),
                "server.host" => host = Some(v.clone()),
                "server.port" => port = Some(v.clone()),
                "export" => export = Some(v.clone()),
                "filename" => uri = Some(parse_uri(v)?),
                "tls-creds" => return Err("TLS is not supported by this NBD client".into()),
                "reconnect-delay" => reconnect = secs(k, v)?,
                "open-timeout" => open = secs(k, v)?,
                "request-timeout" => request = secs(k, v)?,
                "node-name" | "read-only" => {}
                _ => return Err(format!("Invalid parameter '{k}'")),
            }
        }
        let (server, export) = match uri {
            Some(u) => u,
            None => {
                let server = match ty.as_deref() {
                    None => return Err("Parameter 'type' is missing".into()),
                    Some("unix") => NbdServer::Unix(path.ok_or("Parameter 'path' is missing")?),
                    Some("inet") => NbdServer::Inet(
                        host.ok_or("Parameter 'host' is missing")?,
                        port.unwrap_or_else(|| "10809".into()),
                    ),
                    Some(other) => {
                        return Err(format!("Parameter 'type' does not accept value '{other}'"))
                    }
                };
                (server, export.unwrap_or_default())
            }
        };
        Ok(NbdConfig {
            server,
            export,
            reconnect_delay: Duration::from_secs(reconnect),
            open_timeout: Duration::from_secs(open),
            request_timeout: (request > 0).then(|| Duration::from_secs(request)),
        })
    }
}

impl NbdConfig {
    /// The server and export of an `nbd+unix:///EXPORT?socket=PATH` or
    /// `nbd://HOST[:PORT]/EXPORT` URI, other options at their defaults.
    ///
    /// # Errors
    /// `Invalid NBD URI '...'`.
    pub fn from_uri(uri: &str) -> Result<NbdConfig, String> {
        let (server, export) = parse_uri(uri)?;
        Ok(NbdConfig {
            server,
            export,
            reconnect_delay: Duration::ZERO,
            open_timeout: Duration::ZERO,
            request_timeout: None,
        })
    }

    /// The node's file name as QEMU prints it (`nbd_refresh_filename`):
    /// `nbd+unix:///EXPORT?socket=PATH`, `nbd+unix://?socket=PATH` without an
    /// export, `nbd://HOST:PORT/EXPORT`, `nbd://HOST:PORT`.
    pub fn exact_filename(&self) -> String {
        match (&self.server, self.export.is_empty()) {
            (NbdServer::Unix(p), false) => format!("nbd+unix:///{}?socket={p}", self.export),
            (NbdServer::Unix(p), true) => format!("nbd+unix://?socket={p}"),
            (NbdServer::Inet(h, port), false) => format!("nbd://{h}:{port}/{}", self.export),
            (NbdServer::Inet(h, port), true) => format!("nbd://{h}:{port}"),
        }
    }
}

fn parse_uri(uri: &str) -> Result<(NbdServer, String), String> {
    let bad = || format!("Invalid NBD URI '{uri}'");
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path_part, query) = rest.split_once('?').ok_or_else(bad)?;
        let socket = query.strip_prefix("socket=").ok_or_else(bad)?;
        Ok((
            NbdServer::Unix(socket.to_owned()),
            path_part.trim_start_matches('/').to_owned(),
        ))
    } else if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
        Ok((
            NbdServer::Inet(host.to_owned(), port.to_owned()),
            export.to_owned(),
        ))
    } else {
        Err(bad())
    }
}

/// A storage on an NBD export, over one connection; requests are sent one at a
/// time. The export has a fixed size: writes past it fail with EINVAL (as QEMU's
/// client); reads past it read zeroes.
///
/// **Block status.** When the server offers the `base:allocation` meta context
/// (negotiated with `NBD_OPT_SET_META_CONTEXT`), [`Storage::data_extent`] and
/// [`Storage::is_hole`] ask it with `NBD_CMD_BLOCK_STATUS`: a run is a hole
/// (reads as zeroes, no data) when the server says `NBD_STATE_HOLE` and
/// `NBD_STATE_ZERO`, data otherwise (a hole whose content the server does not
/// promise to be zero is data for us, so a hole always reads as zeroes). Without
/// the context everything is data, as QEMU's client says.
///
/// **Reconnect** (`reconnect-delay`, QEMU's): when the connection breaks (the
/// server went away, a reply timed out, the server broke the protocol), the
/// request in flight and the requests that arrive meanwhile wait while the client
/// connects again, for at most `reconnect-delay` seconds after the break; then
/// they are sent again on the new connection. Requests run one at a time and a
/// request is acknowledged only after the server's reply, so an acknowledged write
/// was taken by the server and a retried one is written again whole. When the
/// delay is over (or is 0, the default), the request fails with EIO and each later
/// request tries to connect once before failing, as QEMU's. A server that comes
/// back with another export size is refused (EIO).
#[derive(Debug)]
pub struct NbdStorage {
    cfg: NbdConfig,
    state: Mutex<State>,
    size: u64,
    flags: u16,
    reconnects: AtomicU64,
    /// The last connection agreed to `base:allocation`.
    block_status: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// `None` while disconnected.
    conn: Option<Conn>,
    /// When the connection broke (cleared on reconnect).
    down_since: Option<Instant>,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// How long to wait between connection attempts while reconnecting.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

fn connect_stream(server: &NbdServer) -> io::Result<Box<dyn Stream>> {
    Ok(match server {
        NbdServer::Unix(p) => Box::new(UnixStream::connect(p)?),
        NbdServer::Inet(h, port) => {
            let s = TcpStream::connect(format!("{h}:{port}"))?;
            let _ = s.set_nodelay(true);
            Box::new(s)
        }
    })
}

/// Connects and negotiates once. Outer error: no connection (a socket error or a
/// broken handshake); inner: the server refused the export.
fn open_conn(cfg: &NbdConfig) -> io::Result<Result<Conn, ServerError>> {
    let stream = connect_stream(&cfg.server)?;
    Conn::handshake(stream, &cfg.export, cfg.request_timeout)
}

impl NbdStorage {
    /// Connects, negotiates and opens the export of `cfg`. With `open-timeout`,
    /// failed attempts are repeated until it has passed.
    ///
    /// # Errors
    /// QEMU's text: `Failed to connect to 'PATH': ...`, or the server's refusal.
    pub fn connect(cfg: &NbdConfig) -> Result<NbdStorage, String> {
        let start = Instant::now();
        let conn = loop {
            match open_conn(cfg) {
                Ok(Ok(c)) => break c,
                Ok(Err(ServerError(e))) => return Err(e.to_string()),
                Err(e) if start.elapsed() >= cfg.open_timeout => {
                    let target = match &cfg.server {
                        NbdServer::Unix(p) => p.clone(),
                        NbdServer::Inet(h, port) => format!("{h}:{port}"),
                    };
                    return Err(match e.raw_os_error() {
                        Some(code) => {
                            format!("Failed to connect to '{target}': {}", strerror(code))
                        }
                        None => e.to_string(),
                    });
                }
                Err(_) => std::thread::sleep(RETRY_PAUSE),
            }
        };
        let has_status = conn.base_allocation.is_some();
        Ok(NbdStorage {
            cfg: cfg.clone(),
            size: conn.size,
            flags: conn.flags,
            state: Mutex::new(State {
                conn: Some(conn),
                down_since: None,
            }),
            reconnects: AtomicU64::new(0),
            block_status: AtomicBool::new(has_status),
        })
    }

    /// The export's transmission flags (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// How many times the client connected again after a broken connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the server agreed to the `base:allocation` meta context (so block
    /// status queries ask it) on the last connection.
    pub fn has_block_status(&self) -> bool {
        self.block_status.load(Ordering::Relaxed)
    }

    /// Connects again after a break: retries until `reconnect-delay` has passed
    /// since the break (at least one attempt).
    fn reconnect(&self, st: &mut State) -> io::Result<()> {
        let since = *st.down_since.get_or_insert_with(Instant::now);
        loop {
            match open_conn(&self.cfg) {
                Ok(Ok(c)) if c.size == self.size => {
                    self.block_status
                        .store(c.base_allocation.is_some(), Ordering::Relaxed);
                    st.conn = Some(c);
                    st.down_since = None;
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // Another export size, or the export is gone: not the same disk.
                Ok(_) => return Err(eio()),
                Err(_) => {
                    // No `since + delay`: a delay near 2^64 s must not overflow.
                    let left = self.cfg.reconnect_delay.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        return Err(eio());
                    }
                    std::thread::sleep(left.min(RETRY_PAUSE));
                }
            }
        }
    }

    /// One request, reconnecting and resending as `reconnect-delay` allows.
    fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        out: &[u8],
        mut reply: Reply<'_>,
    ) -> io::Result<()> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| io::Error::other("NBD lock poisoned"))?;
        loop {
            if st.conn.is_none() {
                self.reconnect(&mut st)?;
            }
            let Some(conn) = st.conn.as_mut() else {
                return Err(eio());
            };
            let r = match &mut reply {
                Reply::None => Reply::None,
                Reply::Read(b) => Reply::Read(b),
                Reply::Status(v) => {
                    v.clear();
                    Reply::Status(v)
                }
            };
            match conn.exchange(command, flags, offset, len, out, r) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(ServerError(e))) => return Err(e),
                Err(_) => {
                    st.conn = None;
                    let since = *st.down_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.cfg.reconnect_delay {
                        return Err(eio());
                    }
                }
            }
        }
    }

    /// `base:allocation` from `offset` for at most `max` bytes: `(is_data,
    /// len)`, `0 < len <= max`, runs of the same kind merged.
    fn block_status(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        if offset >= self.size {
            return Ok((false, max));
        }
        if !self.has_block_status() {
            return Ok((true, max));
        }
        // At most 2 GiB per request, as QEMU's client asks.
        let len = max.min(self.size - offset).min(1 << 31) as u32;
        let mut ext = Vec::new();
        self.request(
            cmd::BLOCK_STATUS,
            0,
            offset,
            len,
            &[],
            Reply::Status(&mut ext),
        )?;
        let is_data = |f: u32| f & (alloc::HOLE | alloc::ZERO) != (alloc::HOLE | alloc::ZERO);
        let Some(&(_, f0)) = ext.first() else {
            return Err(conn::protocol("empty block status"));
        };
        let kind = is_data(f0);
        let run: u64 = ext
            .iter()
            .take_while(|(_, f)| is_data(*f) == kind)
            .map(|(n, _)| u64::from(*n))
            .sum();
        Ok((kind, run.clamp(1, max)))
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
                Reply::Read(&mut buf[done..done + n]),
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
            self.request(cmd::WRITE, 0, at, part.len() as u32, part, Reply::None)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(cmd::FLUSH, 0, 0, 0, &[], Reply::None)
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
                self.request(cmd::WRITE_ZEROES, 0, pos, n as u32, &[], Reply::None)?;
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

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let (is_data, n) = self.block_status(pos, end - pos)?;
            if is_data {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    fn data_extent(&self, offset: u64, max: u64) -> io::Result<(bool, u64)> {
        if max == 0 {
            return Ok((true, 0));
        }
        self.block_status(offset, max)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            if let Some(c) = st.conn.as_mut() {
                c.disconnect();
            }
        }
    }
}
