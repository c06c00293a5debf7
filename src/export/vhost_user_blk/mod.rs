//! vhost-user-blk export: serves an [`Image`] as a virtio-blk device to a
//! vhost-user front-end (QEMU's `-device vhost-user-blk-pci`, libblkio,
//! cloud-hypervisor ...), like `qemu-storage-daemon --export
//! type=vhost-user-blk`.
//!
//! Built on the rust-vmm crates: `vhost-user-backend` runs the vhost-user
//! protocol on a Unix socket and one worker thread per virtqueue; each
//! worker pops request chains from its split virtqueue, reads the request
//! header and data out of guest memory (shared with the front-end through
//! memfds) and calls the public [`Image`] API (`read_vectored_at`,
//! `write_vectored_at`, `flush`, `discard`, `write_zeroes`) on the shared
//! `Arc<Image>`.
//!
//! Data is read and written in guest memory in place: the data descriptors
//! of a request are lent to the image's vectored calls as `IoSlice`s (the
//! conversion is the `guest_io` module, the export's only `unsafe`). A
//! buffer that is not contiguous in one guest memory region goes through a
//! bounded per-worker buffer of at most [`CHUNK`] bytes instead.
//! Malformed requests complete with `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP`; a chain too broken to carry a status byte is
//! returned to the driver with a used length of 0. Nothing here panics on
//! what the front-end sends.

mod guest_io;
mod request;

use crate::Image;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use request::{process_chain, Outcome, CHUNK};

/// Sector size of the virtio-blk protocol (request offsets are in 512-byte units).
pub const SECTOR: u64 = 512;
/// Largest number of data segments the device advertises (`seg_max`).
pub const SEG_MAX: u32 = 128 - 2;
/// Largest number of sectors one discard or write-zeroes segment may cover.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// Largest queue size a front-end may configure.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest number of request queues.
pub const MAX_QUEUES: u16 = 64;

/// The feature bit `bit` as a mask (the bindings give bit numbers).
const fn bit(bit: u32) -> u64 {
    1 << bit
}

/// Errors of the vhost-user-blk export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is out of range.
    #[error("invalid vhost-user-blk configuration: {0}")]
    Config(String),
    /// The socket could not be created or bound.
    #[error("Failed to bind socket to {path}: {source}")]
    Bind {
        /// The socket path.
        path: String,
        /// What the OS said.
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user daemon failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// An I/O error outside a request (eventfd creation).
    #[error("vhost-user-blk: {0}")]
    Io(#[from] io::Error),
}

/// How the device presents itself.
#[derive(Debug, Clone)]
pub struct BlkConfig {
    /// Number of request queues (1..=[`MAX_QUEUES`]), one worker thread each.
    pub num_queues: u16,
    /// Export read-only (`VIRTIO_BLK_F_RO`); also implied by a read-only image.
    pub read_only: bool,
    /// The device id returned by `VIRTIO_BLK_T_GET_ID` (at most 20 bytes used).
    pub serial: String,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            read_only: false,
            serial: String::new(),
        }
    }
}

/// The vhost-user-blk device: a [`VhostUserBackend`] over a shared [`Image`].
pub struct BlkBackend {
    img: Arc<Image>,
    cfg: BlkConfig,
    read_only: bool,
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    exits: Mutex<Vec<EventFd>>,
    /// The rings of the current connection, kept as the workers see them so
    /// that [`BlkBackend::quiesce`] can finish requests already made
    /// available whose kick no worker has picked up yet.
    /// One slot per worker thread.
    vrings: Mutex<Vec<Vec<VringRwLock>>>,
    stopping: AtomicBool,
    in_flight: AtomicUsize,
    event_idx: AtomicBool,
}

impl std::fmt::Debug for BlkBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkBackend")
            .field("cfg", &self.cfg)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl BlkBackend {
    /// A device serving `img` as configured.
    pub fn new(img: Arc<Image>, cfg: BlkConfig) -> Result<Arc<Self>, Error> {
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(Error::Config(format!(
                "num-queues must be between 1 and {MAX_QUEUES}, not {}",
                cfg.num_queues
            )));
        }
        let read_only = cfg.read_only || img.is_read_only();
        Ok(Arc::new(BlkBackend {
            img,
            cfg,
            read_only,
            mem: Mutex::new(None),
            exits: Mutex::new(Vec::new()),
            vrings: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            event_idx: AtomicBool::new(false),
        }))
    }

    /// Whether the device is exported read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The virtio-blk configuration space (`struct virtio_blk_config`, 60 bytes).
    pub fn config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put = |c: &mut [u8], at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(&mut c, 0, &(self.img.size() / SECTOR).to_le_bytes()); // capacity
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
        put(&mut c, 20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(&mut c, 34, &self.cfg.num_queues.to_le_bytes()); // num_queues
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &1u32.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Stops taking new requests and finishes the ones in flight: those a
    /// worker is processing, and those the driver has already made
    /// available on an enabled ring (a kick not yet picked up is in flight
    /// from the guest's point of view). The image can then be flushed and
    /// closed. Requests made available after this returns are not served.
    pub fn quiesce(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // No worker touches a ring any more (a late kick sees `stopping`);
        // drain what is still available on each enabled ring.
        let vrings = match self.vrings.lock() {
            Ok(v) => v.clone(),
            Err(_) => return,
        };
        for vring in vrings.iter().flatten() {
            if vring.get_ref().get_queue().ready() {
                // Best effort: a ring the front-end left half set up just
                // yields no chains; an error here cannot be reported to it.
                let _ = self.process_queue(vring);
            }
        }
    }

    /// Remembers the rings worker `thread` serves on this connection.
    fn note_vrings(&self, thread: usize, vrings: &[VringRwLock]) {
        if let Ok(mut kept) = self.vrings.lock() {
            if let Some(slot) = kept.get_mut(thread) {
                if slot.is_empty() {
                    *slot = vrings.to_vec();
                }
            }
        }
    }

    /// Fresh exit events for the worker threads of the next connection.
    fn reset_exits(&self) -> io::Result<()> {
        let exits = (0..self.cfg.num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        *self.exits.lock().map_err(|_| poisoned())? = exits;
        *self.vrings.lock().map_err(|_| poisoned())? =
            vec![Vec::new(); usize::from(self.cfg.num_queues)];
        Ok(())
    }

    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.lock().map_err(|_| poisoned())?.clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut buf = Vec::new();
        loop {
            if self.event_idx.load(Ordering::Relaxed) {
                vring.disable_notification().map_err(queue_err)?;
            }
            let mut any = false;
            loop {
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                any = true;
                let head = chain.head_index();
                let out =
                    process_chain(&self.img, &self.cfg.serial, self.read_only, chain, &mut buf);
                vring.add_used(head, out.used_len).map_err(queue_err)?;
            }
            if any && vring.needs_notification().map_err(queue_err)? {
                vring.signal_used_queue()?;
            }
            if !self.event_idx.load(Ordering::Relaxed)
                || !vring.enable_notification().map_err(queue_err)?
            {
                break;
            }
        }
        Ok(())
    }
}

fn poisoned() -> io::Error {
    io::Error::other("vhost-user-blk: memory lock poisoned")
}

fn queue_err(e: virtio_queue::Error) -> io::Error {
    io::Error::other(format!("virtqueue: {e}"))
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.cfg.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(MAX_QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_MQ)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = (offset as usize).min(space.len());
        let end = start.saturating_add(size as usize).min(space.len());
        space[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.lock().map_err(|_| poisoned())? = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.cfg.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<EventFd> {
        self.exits
            .lock()
            .ok()?
            .get(thread_index)
            .and_then(|e| e.try_clone().ok())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        self.note_vrings(thread_id, vrings);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let r = if self.stopping.load(Ordering::SeqCst) {
            Ok(())
        } else {
            self.process_queue(vring)
        };
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

/// Binds the vhost-user socket at `path` (replacing a stale socket file).
pub fn bind(path: &Path) -> Result<Listener, Error> {
    Listener::new(path, true).map_err(|source| Error::Bind {
        path: path.display().to_string(),
        source,
    })
}

/// A log sink for connects, disconnects and errors (one line each).
pub type LogFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Serves front-ends on `listener`, one connection at a time, until `stop`
/// is set (checked between connections) or the daemon fails. Each
/// connection ends when the front-end hangs up; the socket at `path` is then
/// bound again for the next one. Connects and disconnects go to `log`.
pub fn serve(
    backend: Arc<BlkBackend>,
    mut listener: Listener,
    path: &Path,
    stop: &AtomicBool,
    log: Option<LogFn>,
) -> Result<(), Error> {
    let say = |m: &str| {
        if let Some(l) = &log {
            l(m)
        }
    };
    let mut n = 0u64;
    loop {
        backend.reset_exits()?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("qcow2-vhost-user-blk".into(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        daemon
            .start(listener)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        n += 1;
        say(&format!("front-end {n} connected"));
        let r = daemon.wait();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        match r {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => {}
            Err(e) => {
                say(&format!("front-end {n}: {e}"));
                return Err(Error::Daemon(e.to_string()));
            }
        }
        if stop.load(Ordering::SeqCst) {
            say(&format!("front-end {n} disconnected"));
            return Ok(());
        }
        // Listening again before saying so: a front-end that reconnects
        // on seeing the line finds the socket.
        listener = bind(path)?;
        say(&format!("front-end {n} disconnected"));
    }
}
