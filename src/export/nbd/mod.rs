//! An NBD server over a shared [`Image`]: the fixed newstyle handshake
//! (`NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT`, `SET_META_CONTEXT` and the legacy `EXPORT_NAME`),
//! structured replies, `NBD_CMD_READ/WRITE/FLUSH/TRIM/WRITE_ZEROES/CACHE/
//! BLOCK_STATUS/DISC`, and the `base:allocation`, `qemu:allocation-depth`
//! and `qemu:dirty-bitmap:NAME` (persistent bitmaps chosen in
//! [`ServeConfig::bitmaps`]) metadata contexts.
//!
//! The export is the guest view of the image (its virtual disk, backing
//! chain included), as `qemu-nbd -f qcow2` serves it. Each client gets a
//! thread; all share the one `Image`, whose own locking orders their
//! requests. Request payloads are bounded by [`proto::MAX_PAYLOAD`] (32 MiB,
//! the advertised maximum block size), option payloads by
//! [`proto::MAX_OPTION_LEN`]; anything malformed gets an NBD error or, when
//! the stream cannot be trusted any more (a bad magic, an oversized write),
//! closes that connection only.
//!
//! ```no_run
//! use qcow2kit::export::nbd::{Listener, ServeConfig, Server};
//! use qcow2kit::{Image, OpenOptions};
//! use std::sync::{atomic::Ordering, Arc};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let img = Arc::new(Image::open("disk.qcow2", &OpenOptions::new())?);
//! let listener = Listener::bind_unix("/tmp/disk.sock")?;
//! let server = Server::new(img.clone(), listener, ServeConfig::default());
//! let stop = server.stop_flag(); // set it (e.g. from a signal handler) to stop
//! # stop.store(true, Ordering::SeqCst);
//! server.run()?; // serves until `stop` is set, then flushes
//! img.shutdown()?;
//! # Ok(())
//! # }
//! ```

mod conn;
pub mod proto;
pub mod status;

use crate::Image;
use conn::{Conn, End, ExportConfig};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often idle loops look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// How long a stop waits for connections before shutting their sockets.
const GRACE: Duration = Duration::from_secs(10);

/// A log sink for connects, disconnects and errors (one line each).
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// How the server serves its export.
#[derive(Clone)]
pub struct ServeConfig {
    /// The export's name (`""`, the default export, unless set).
    pub export_name: String,
    /// How many clients are served at once; more wait in the listen queue
    /// until one leaves (as with `qemu-nbd -e N`). At least 1.
    pub max_clients: usize,
    /// Client TRIM requests discard in the image (`false`: accepted and
    /// ignored, `--discard=ignore`).
    pub discard: bool,
    /// Where connects, disconnects and connection errors are reported.
    pub log: Option<LogFn>,
    /// Persistent dirty bitmaps of the image to export, each as the
    /// metadata context `qemu:dirty-bitmap:NAME` (`qemu-nbd -B NAME`), in
    /// the order contexts are listed. Check them with
    /// [`ServeConfig::check_bitmaps`] before serving: a bitmap that is
    /// missing or inconsistent fails its block status requests.
    pub bitmaps: Vec<String>,
}

impl ServeConfig {
    /// Checks that every bitmap of [`ServeConfig::bitmaps`] exists in `img`
    /// and is consistent, as `qemu-nbd -B` does before serving.
    ///
    /// # Errors
    /// `Error::Bitmap` with qemu-nbd's cases: [`BitmapError::NotFound`],
    /// [`BitmapError::Inconsistent`]; the errors of reading the bitmap
    /// directory.
    ///
    /// [`BitmapError::NotFound`]: crate::error::BitmapError::NotFound
    /// [`BitmapError::Inconsistent`]: crate::error::BitmapError::Inconsistent
    pub fn check_bitmaps(&self, img: &Image) -> crate::Result<()> {
        use crate::error::BitmapError;
        let have = img.bitmaps()?;
        for name in &self.bitmaps {
            match have.iter().find(|b| &b.name == name) {
                None => {
                    return Err(crate::Error::Bitmap(BitmapError::NotFound {
                        name: name.clone(),
                    }))
                }
                Some(b) if b.inconsistent => {
                    return Err(crate::Error::Bitmap(BitmapError::Inconsistent {
                        name: name.clone(),
                    }))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            export_name: String::new(),
            max_clients: 8,
            discard: true,
            log: None,
            bitmaps: Vec::new(),
        }
    }
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("export_name", &self.export_name)
            .field("max_clients", &self.max_clients)
            .field("discard", &self.discard)
            .field("log", &self.log.is_some())
            .field("bitmaps", &self.bitmaps)
            .finish()
    }
}

/// A listening socket: TCP or Unix domain.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix domain socket; its path is removed when the server stops.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on a TCP address (`127.0.0.1:10809`; port 0 picks a free one).
    ///
    /// # Errors
    /// The socket errors.
    pub fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr)?))
    }

    /// Listens on a Unix domain socket at `path` (which must not exist).
    ///
    /// # Errors
    /// The socket errors.
    pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<Listener> {
        let path = path.as_ref();
        Ok(Listener::Unix(
            UnixListener::bind(path)?,
            path.to_path_buf(),
        ))
    }

    /// The address clients connect to: `IP:PORT` or the socket path.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(POLL))?;
                Ok((Stream::Tcp(s), peer.to_string()))
            }
            Listener::Unix(l, p) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(POLL))?;
                Ok((Stream::Unix(s), p.display().to_string()))
            }
        }
    }
}

/// A client connection.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the socket, to shut it down from the server.
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shuts the socket down both ways: blocked reads and writes return.
    fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// An NBD server of one image on one listening socket.
#[derive(Debug)]
pub struct Server {
    img: Arc<Image>,
    listener: Listener,
    cfg: ServeConfig,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// A server exporting `img` on `listener`. The export is read-only when
    /// the image was opened read-only.
    pub fn new(img: Arc<Image>, listener: Listener, cfg: ServeConfig) -> Server {
        Server {
            img,
            listener,
            cfg,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag that stops [`Server::run`]: setting it (from any thread or a
    /// signal handler) stops accepting, lets each client's request in
    /// progress finish, and closes the connections.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The address clients connect to (see [`Listener::address`]).
    pub fn address(&self) -> String {
        self.listener.address()
    }

    fn log(&self, msg: &str) {
        if let Some(l) = &self.cfg.log {
            l(msg);
        }
    }

    /// Serves clients until the stop flag is set, then waits for the
    /// connections to finish, removes a Unix socket and flushes the image.
    /// The image stays open: close it with [`Image::shutdown`].
    ///
    /// # Errors
    /// [`ServeError::Socket`] when the listening socket cannot be set up,
    /// [`ServeError::Image`] when the final flush fails.
    pub fn run(self) -> Result<(), ServeError> {
        self.listener
            .set_nonblocking()
            .map_err(ServeError::Socket)?;
        let export = Arc::new(ExportConfig {
            name: self.cfg.export_name.clone(),
            discard: self.cfg.discard,
            multi_conn: self.cfg.max_clients > 1,
            bitmaps: self.cfg.bitmaps.clone(),
        });
        let max = self.cfg.max_clients.max(1);
        let mut clients: Vec<Client> = Vec::new();
        let mut next_id = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            reap(&mut clients, false);
            if clients.len() >= max {
                std::thread::sleep(POLL);
                continue;
            }
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(POLL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors and the like: wait and go on.
                    self.log(&format!("accept failed: {e}"));
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            next_id += 1;
            let id = next_id;
            self.log(&format!("client {id} connected ({peer})"));
            let handle = stream.try_clone().ok();
            let img = self.img.clone();
            let export = export.clone();
            let stop = self.stop.clone();
            let log = self.cfg.log.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-client-{id}"))
                .spawn(move || {
                    let end = Conn::new(stream, &img, &export, &stop).run();
                    if let Some(l) = log {
                        l(&match end {
                            End::Client => format!("client {id} disconnected"),
                            End::Shutdown => format!("client {id} closed at shutdown"),
                            End::Protocol(m) => {
                                format!("client {id} dropped: protocol error: {m}")
                            }
                            End::Io(e) => format!("client {id} dropped: {e}"),
                        });
                    }
                });
            match spawned {
                Ok(thread) => clients.push(Client { thread, handle }),
                Err(e) => self.log(&format!("cannot start a client thread: {e}")),
            }
        }
        // Stop accepting first, then let the connections finish.
        let Server { img, listener, .. } = self;
        if let Listener::Unix(_, path) = &listener {
            let _ = std::fs::remove_file(path);
        }
        drop(listener);
        // Each connection notices the flag at its next idle moment; one
        // whose client stopped reading its replies is cut off after a grace
        // period.
        let t0 = Instant::now();
        while !clients.is_empty() && t0.elapsed() < GRACE {
            reap(&mut clients, false);
            std::thread::sleep(POLL);
        }
        for c in &clients {
            if let Some(h) = &c.handle {
                h.shutdown();
            }
        }
        reap(&mut clients, true);
        img.flush().map_err(ServeError::Image)
    }
}

/// Why [`Server::run`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listening socket could not be set up.
    #[error("NBD socket: {0}")]
    Socket(#[source] io::Error),
    /// Flushing the image when the server stopped failed.
    #[error("{0}")]
    Image(#[source] crate::Error),
}

/// A client's thread and a handle on its socket.
struct Client {
    thread: JoinHandle<()>,
    handle: Option<Stream>,
}

/// Joins finished client threads (all of them with `all`).
fn reap(clients: &mut Vec<Client>, all: bool) {
    let mut i = 0;
    while i < clients.len() {
        if all || clients[i].thread.is_finished() {
            // A client thread that panicked has already reported it.
            let _ = clients.swap_remove(i).thread.join();
        } else {
            i += 1;
        }
    }
}
