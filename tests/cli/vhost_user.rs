//! `qcow2-img serve --vhost-user-blk` against a vhost-user front-end written
//! here on `vhost`'s frontend side: guest memory in a shared file mapped by
//! both sides, split virtqueues driven from the test (descriptor table,
//! avail and used rings written and read in that memory), requests issued
//! one at a time per queue. The same client is first run against
//! `qemu-storage-daemon --export type=vhost-user-blk` to validate the client
//! itself, then against ours; content is checked against a model and the
//! image by `qemu-img check`. libblkio is not packaged here, hence the
//! hand-written client. Every wait is bounded; tests skip with a message
//! when qemu-img/qemu-storage-daemon are missing.
#![cfg(all(feature = "vhost-user", target_os = "linux"))]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const BIN: &str = env!("CARGO_BIN_EXE_qcow2-img");
const WAIT: Duration = Duration::from_secs(30);

const QSIZE: u16 = 256;
/// Guest memory: per queue 64 KiB of rings, then per queue a 2 MiB buffer area.
const MEM: usize = 8 << 20;
const RINGS: u64 = 0x1_0000;
const BUFS: u64 = 0x10_0000;
const BUF_AREA: u64 = 0x20_0000;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_VERSION_1: u64 = 1 << 32;
const F_PROTOCOL: u64 = 1 << 30;
const F_BLK_SIZE: u64 = 1 << 6;
const F_SEG_MAX: u64 = 1 << 2;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;

fn have(progs: &[&str], test: &str) -> bool {
    let missing: Vec<&str> = progs
        .iter()
        .copied()
        .filter(|p| {
            !Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("skipping {test}: {missing:?} not found");
    }
    missing.is_empty()
}

fn ok(dir: &Path, prog: &str, args: &[&str]) -> String {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    assert!(
        o.status.success(),
        "{prog} {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server process, SIGTERM'd by `stop`, killed on drop.
struct Served {
    child: Option<Child>,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, prog: &str, args: &[&str], sock: &Path) -> Self {
        let log = dir.join("server.log");
        let child = Command::new(prog)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        let mut s = Served {
            child: Some(child),
            log,
        };
        let t0 = Instant::now();
        while !sock.exists() {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{prog} {args:?} exited early ({st}): {}", s.log());
            }
            assert!(t0.elapsed() < WAIT, "{prog} did not come up: {}", s.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `text`.
    fn wait_log(&self, text: &str) {
        let t0 = Instant::now();
        while !self.log().contains(text) {
            assert!(
                t0.elapsed() < WAIT,
                "no {text:?} in the log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, and wait for it to die.
    fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn stop(self) -> (i32, String) {
        self.stop_with("-TERM")
    }

    /// Sends `sig` (a `kill` option such as `-INT`), then the exit code
    /// (bounded wait).
    fn stop_with(mut self, sig: &str) -> (i32, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id().to_string();
        let _ = Command::new("kill").args([sig, &pid]).status();
        let t0 = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > WAIT {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not stop on {sig}: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (st.code().unwrap_or(-1), self.log())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a request's buffers are laid out in guest memory and the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Header, one data descriptor, status.
    Plain,
    /// Data cut into up to four descriptors placed in reverse memory order;
    /// the header shares a descriptor with the first piece of driver data,
    /// the status byte with the last piece of device data (virtio 1's any
    /// layout).
    Split,
    /// `Split`'s descriptors in an indirect table
    /// (`VIRTIO_RING_F_INDIRECT_DESC`).
    Indirect,
    /// One data descriptor across the boundary of the two guest memory
    /// regions (the back-end cannot see it as one contiguous buffer).
    Straddle,
}

/// Where guest memory is split into its two regions (inside queue 0's
/// buffer area).
const REGION_SPLIT: u64 = BUFS + BUF_AREA / 2;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// A request on the available ring, waiting for the device.
struct Posted {
    ty: u32,
    layout: Layout,
    /// The data pieces: (guest address, length), in request order.
    pieces: Vec<(u64, usize)>,
    /// Guest address of the status byte.
    status: u64,
    in_len: usize,
}

/// One split virtqueue driven from the test, one request at a time.
struct Vq {
    mem: Arc<GuestMemoryMmap>,
    desc: u64,
    avail: u64,
    used: u64,
    /// Room for one indirect descriptor table.
    indirect: u64,
    buf: u64,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    last_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    event_idx: bool,
    /// Layouts the requests cycle through.
    layouts: Vec<Layout>,
    rng: Rng,
}

impl Vq {
    fn pick_layout(&mut self) -> Layout {
        let n = self.layouts.len() as u64;
        let l = self.layouts[self.rng.below(n) as usize];
        let area = self.buf..self.buf + BUF_AREA;
        if l == Layout::Straddle && !area.contains(&REGION_SPLIT) {
            Layout::Plain
        } else {
            l
        }
    }

    /// Submits the request `ty` at `sector` with `out` as driver data (OUT,
    /// DISCARD, WRITE_ZEROES) or `in_len` bytes of device data (IN, GET_ID);
    /// returns the status byte, the used length and the device data.
    fn request(&mut self, ty: u32, sector: u64, out: &[u8], in_len: usize) -> (u8, u32, Vec<u8>) {
        let p = self.post(ty, sector, out, in_len);
        self.kick.write(1).unwrap();
        self.complete(p)
    }

    /// Makes the request available on the ring without kicking the device.
    fn post(&mut self, ty: u32, sector: u64, out: &[u8], in_len: usize) -> Posted {
        let layout = self.pick_layout();
        let m = self.mem.clone();
        let hdr = self.buf;
        let dlen = out.len().max(in_len);
        assert!(
            2 * dlen as u64 + 8192 <= BUF_AREA,
            "request too large for the test"
        );
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(hdr)).unwrap();
        let writes = out.is_empty() && in_len > 0;
        // The data pieces: (guest address, length), in request order.
        let mut pieces: Vec<(u64, usize)> = Vec::new();
        let status;
        match layout {
            Layout::Plain | Layout::Straddle => {
                let data = if layout == Layout::Straddle {
                    REGION_SPLIT - (dlen as u64 / 2) - 1
                } else {
                    hdr + 16
                };
                if dlen > 0 {
                    pieces.push((data, dlen));
                }
                status = data + dlen as u64;
            }
            Layout::Split | Layout::Indirect => {
                let k = (1 + self.rng.below(4) as usize).min(dlen.max(1));
                let mut cuts: Vec<usize> = (1..k)
                    .map(|_| 1 + self.rng.below(dlen as u64 - 1) as usize)
                    .collect();
                cuts.push(0);
                cuts.push(dlen);
                cuts.sort_unstable();
                cuts.dedup();
                let lens: Vec<usize> = cuts.windows(2).map(|w| w[1] - w[0]).collect();
                // The first piece of driver data follows the header; the
                // others go in reverse order further up, 512 bytes apart.
                let mut at = hdr + 16 + dlen as u64 + 4096;
                let mut addrs = vec![0u64; lens.len()];
                for (j, &l) in lens.iter().enumerate().rev() {
                    if j == 0 && !writes {
                        addrs[0] = hdr + 16;
                    } else {
                        addrs[j] = at;
                        at += l as u64 + 512;
                    }
                }
                for (j, &l) in lens.iter().enumerate() {
                    if l > 0 {
                        pieces.push((addrs[j], l));
                    }
                }
                status = match pieces.last() {
                    // Device data: the status byte ends its last piece.
                    Some(&(a, l)) if writes => a + l as u64,
                    _ => at,
                };
            }
        }
        let mut at = 0usize;
        for &(a, l) in &pieces {
            if !out.is_empty() {
                m.write_slice(&out[at..at + l], GuestAddress(a)).unwrap();
            } else {
                m.write_slice(&vec![0xeeu8; l], GuestAddress(a)).unwrap();
            }
            at += l;
        }
        m.write_obj(0xffu8, GuestAddress(status)).unwrap();
        // Descriptors: (address, length, flags) without NEXT.
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        let data_flags = if writes { VIRTQ_DESC_F_WRITE } else { 0 };
        let any_layout = matches!(layout, Layout::Split | Layout::Indirect);
        if any_layout && !writes && !pieces.is_empty() {
            descs.push((hdr, 16 + pieces[0].1 as u32, 0));
            for &(a, l) in &pieces[1..] {
                descs.push((a, l as u32, 0));
            }
            descs.push((status, 1, VIRTQ_DESC_F_WRITE));
        } else if any_layout && writes {
            descs.push((hdr, 16, 0));
            let last = pieces.len() - 1;
            for (j, &(a, l)) in pieces.iter().enumerate() {
                let l = if j == last { l + 1 } else { l };
                descs.push((a, l as u32, VIRTQ_DESC_F_WRITE));
            }
        } else {
            descs.push((hdr, 16, 0));
            for &(a, l) in &pieces {
                descs.push((a, l as u32, data_flags));
            }
            descs.push((status, 1, VIRTQ_DESC_F_WRITE));
        }
        let write_table = |table: u64, descs: &[(u64, u32, u16)]| {
            let n = descs.len();
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let at = table + 16 * i as u64;
                let next = if i + 1 < n { VIRTQ_DESC_F_NEXT } else { 0 };
                m.write_obj(addr, GuestAddress(at)).unwrap();
                m.write_obj(len, GuestAddress(at + 8)).unwrap();
                m.write_obj(flags | next, GuestAddress(at + 12)).unwrap();
                m.write_obj((i + 1) as u16, GuestAddress(at + 14)).unwrap();
            }
        };
        if layout == Layout::Indirect {
            write_table(self.indirect, &descs);
            let table = [(
                self.indirect,
                16 * descs.len() as u32,
                VIRTQ_DESC_F_INDIRECT,
            )];
            write_table(self.desc, &table);
        } else {
            write_table(self.desc, &descs);
        }
        let slot = u64::from(self.next_avail % QSIZE);
        m.write_obj(0u16, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        if self.event_idx {
            // used_event: notify us once this request is used.
            m.write_obj(
                self.last_used,
                GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE)),
            )
            .unwrap();
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        m.write_obj(self.next_avail, GuestAddress(self.avail + 2))
            .unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Posted {
            ty,
            layout,
            pieces,
            status,
            in_len,
        }
    }

    /// Whether the device has used the oldest outstanding request.
    fn used_yet(&self) -> bool {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        idx != self.last_used
    }

    /// Waits for the device to use the posted request `p`; returns its status
    /// byte, used length and device data.
    fn complete(&mut self, p: Posted) -> (u8, u32, Vec<u8>) {
        let Posted {
            ty,
            layout,
            pieces,
            status,
            in_len,
        } = p;
        let m = self.mem.clone();
        // The device notifies us (avail flags 0, or used_event reached):
        // wait for the call event, then for the used index.
        let t0 = Instant::now();
        loop {
            let idx: u16 = m.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx != self.last_used {
                break;
            }
            assert!(
                t0.elapsed() < WAIT,
                "request {ty} ({layout:?}) not completed"
            );
            assert!(
                wait_readable(&self.call),
                "no used-buffer notification for request {ty} ({layout:?})"
            );
            let _ = self.call.read();
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let slot = u64::from(self.last_used % QSIZE);
        let id: u32 = m.read_obj(GuestAddress(self.used + 4 + 8 * slot)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(self.used + 8 + 8 * slot)).unwrap();
        assert_eq!(id, 0, "used element names the head we submitted");
        self.last_used = self.last_used.wrapping_add(1);
        let st: u8 = m.read_obj(GuestAddress(status)).unwrap();
        let mut got = vec![0u8; in_len];
        if in_len > 0 {
            let mut at = 0usize;
            for &(a, l) in &pieces {
                m.read_slice(&mut got[at..at + l], GuestAddress(a)).unwrap();
                at += l;
            }
        }
        (st, len, got)
    }

    fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        let (st, used, d) = self.request(T_IN, off / 512, &[], len);
        assert_eq!((st, used), (S_OK, len as u32 + 1), "read {off}+{len}");
        d
    }

    fn write(&mut self, off: u64, data: &[u8]) {
        let (st, used, _) = self.request(T_OUT, off / 512, data, 0);
        assert_eq!((st, used), (S_OK, 1), "write {off}+{}", data.len());
    }

    fn seg(&mut self, ty: u32, off: u64, len: u64, flags: u32) -> u8 {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&(off / 512).to_le_bytes());
        s[8..12].copy_from_slice(&((len / 512) as u32).to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        self.request(ty, 0, &s, 0).0
    }
}

/// Waits (at most [`WAIT`]) until `fd` is readable.
fn wait_readable(fd: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
    let ep = Epoll::new().unwrap();
    ep.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(EventSet::IN, 0),
    )
    .unwrap();
    let mut ev = [EpollEvent::default()];
    matches!(ep.wait(WAIT.as_millis() as i32, &mut ev), Ok(1))
}

/// What the front-end negotiates and how it lays out requests.
#[derive(Debug, Clone)]
struct Opts {
    /// Ack `VIRTIO_RING_F_EVENT_IDX` and `VIRTIO_RING_F_INDIRECT_DESC`
    /// (both must be offered).
    ring_features: bool,
    /// Request layouts, picked at random per request.
    layouts: Vec<Layout>,
}

impl Opts {
    fn plain() -> Opts {
        Opts {
            ring_features: false,
            layouts: vec![Layout::Plain],
        }
    }

    fn all() -> Opts {
        Opts {
            ring_features: true,
            layouts: vec![
                Layout::Plain,
                Layout::Split,
                Layout::Indirect,
                Layout::Straddle,
            ],
        }
    }
}

/// A connected front-end: negotiated features, the config space, the queues.
struct Client {
    _fe: Frontend,
    /// What the back-end offered.
    offered: u64,
    /// What we acked.
    features: u64,
    config: Vec<u8>,
    queues: Vec<Vq>,
}

fn connect(sock: &Path, nq: u16) -> Client {
    connect_with(sock, nq, &Opts::plain())
}

/// Connects with `nq` queues; guest memory is two regions (two files,
/// adjacent guest addresses, split at [`REGION_SPLIT`]).
fn connect_with(sock: &Path, nq: u16, opts: &Opts) -> Client {
    let mut fe = Frontend::connect(sock, u64::from(nq)).unwrap();
    let offered = fe.get_features().unwrap();
    assert_ne!(offered & F_PROTOCOL, 0, "PROTOCOL_FEATURES offered");
    fe.set_owner().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    let want = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(pf & want).unwrap();
    assert!(fe.get_queue_num().unwrap() >= u64::from(nq));
    let acked = offered
        & (F_VERSION_1
            | F_PROTOCOL
            | F_RO
            | F_FLUSH
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_BLK_SIZE
            | F_SEG_MAX);
    let ring = F_EVENT_IDX | F_INDIRECT_DESC;
    let acked = if opts.ring_features {
        assert_eq!(offered & ring, ring, "EVENT_IDX and INDIRECT_DESC offered");
        acked | ring
    } else {
        acked
    };
    fe.set_features(acked).unwrap();
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .unwrap();

    let region_file = |len: u64| {
        let f = tempfile::tempfile_in("/dev/shm")
            .or_else(|_| tempfile::tempfile())
            .unwrap();
        f.set_len(len).unwrap();
        Some(FileOffset::new(f, 0))
    };
    let split = REGION_SPLIT as usize;
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files([
        (GuestAddress(0), split, region_file(REGION_SPLIT)),
        (
            GuestAddress(REGION_SPLIT),
            MEM - split,
            region_file((MEM - split) as u64),
        ),
    ])
    .unwrap();
    let mem = Arc::new(mem);
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let infos: Vec<_> = [GuestAddress(0), GuestAddress(REGION_SPLIT)]
        .iter()
        .map(|&a| {
            VhostUserMemoryRegionInfo::from_guest_region(mem.find_region(a).unwrap()).unwrap()
        })
        .collect();
    fe.set_mem_table(&infos).unwrap();
    let mut queues = Vec::new();
    for q in 0..usize::from(nq) {
        let base = RINGS * q as u64;
        let (desc, avail, used) = (base, base + 0x4000, base + 0x8000);
        fe.set_vring_num(q, QSIZE).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: host + desc,
                used_ring_addr: host + used,
                avail_ring_addr: host + avail,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(q, &call).unwrap();
        fe.set_vring_kick(q, &kick).unwrap();
        fe.set_vring_enable(q, true).unwrap();
        queues.push(Vq {
            mem: mem.clone(),
            desc,
            avail,
            used,
            indirect: base + 0xc000,
            buf: BUFS + BUF_AREA * q as u64,
            kick,
            call,
            next_avail: 0,
            last_used: 0,
            event_idx: opts.ring_features,
            layouts: opts.layouts.clone(),
            rng: Rng(0x5eed_0000 + q as u64),
        });
    }
    // SET_VRING_ENABLE gets no reply, and a kick that reaches a worker before
    // the back-end's message thread has enabled the ring is consumed and
    // dropped (vhost-user-backend checks `enabled` when it reads the kick).
    // A request that is answered orders us after every message sent so far.
    fe.get_features().unwrap();
    Client {
        _fe: fe,
        offered,
        features: acked,
        config,
        queues,
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// xorshift: the test's reproducible randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const DISK: u64 = 16 << 20;
const CLUSTER: u64 = 64 << 10;

/// Random read/write/discard/write-zeroes/flush on `vq` within
/// `[lo, lo + span)`, checked against `model` (which covers that span).
fn exercise(vq: &mut Vq, lo: u64, span: u64, seed: u64, model: &mut [u8]) {
    let mut rng = Rng(seed);
    for i in 0..120u32 {
        match rng.below(10) {
            0..=3 => {
                let len = (1 + rng.below(256)) * 512;
                let off = rng.below((span - len) / 512 + 1) * 512;
                let byte = (rng.next() & 0xff) as u8 | 1;
                let mut d = vec![byte; len as usize];
                d[0] = i as u8;
                vq.write(lo + off, &d);
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            4..=6 => {
                let len = (1 + rng.below(256)) * 512;
                let off = rng.below((span - len) / 512 + 1) * 512;
                let got = vq.read(lo + off, len as usize);
                assert!(
                    got == model[off as usize..(off + len) as usize],
                    "read {}+{len} differs from the model",
                    lo + off
                );
            }
            7 => {
                // Whole clusters: what qcow2 discards for sure (reads zero after).
                let n = 1 + rng.below(4);
                let off = rng.below(span / CLUSTER - n + 1) * CLUSTER;
                assert_eq!(vq.seg(T_DISCARD, lo + off, n * CLUSTER, 0), S_OK);
                model[off as usize..(off + n * CLUSTER) as usize].fill(0);
            }
            8 => {
                let len = (1 + rng.below(300)) * 512;
                let off = rng.below((span - len) / 512 + 1) * 512;
                let flags = (rng.next() & 1) as u32;
                assert_eq!(vq.seg(T_WRITE_ZEROES, lo + off, len, flags), S_OK);
                model[off as usize..(off + len) as usize].fill(0);
            }
            _ => assert_eq!(vq.request(T_FLUSH, 0, &[], 0).0, S_OK),
        }
    }
    for (k, want) in model.chunks(256 << 10).enumerate() {
        let off = lo + (k as u64) * (256 << 10);
        let got = vq.read(off, want.len());
        assert!(got == want, "final read at {off} differs from the model");
    }
}

/// Runs the whole client against a server on `sock` with `nq` queues;
/// returns the disk content it expects.
fn drive(sock: &Path, nq: u16, opts: &Opts, serial_expected: Option<&str>) -> Vec<u8> {
    let mut c = connect_with(sock, nq, opts);
    if serial_expected.is_some() {
        // Ours offers exactly what it implements (no stray device bits).
        let known = F_VERSION_1
            | F_PROTOCOL
            | F_INDIRECT_DESC
            | F_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES;
        assert_eq!(c.offered, known, "offered features");
    }
    assert_eq!(le64(&c.config, 0), DISK / 512, "capacity");
    assert_eq!(le32(&c.config, 20), 512, "blk_size");
    assert_ne!(c.features & F_FLUSH, 0);
    assert_ne!(c.features & F_DISCARD, 0);
    assert_ne!(c.features & F_WRITE_ZEROES, 0);
    assert_eq!(c.features & F_RO, 0);
    if nq > 1 {
        assert_ne!(c.features & F_MQ, 0);
        assert_eq!(u16::from_le_bytes([c.config[34], c.config[35]]), nq);
    }
    // Requests that must fail cleanly.
    let q0 = &mut c.queues[0];
    assert_eq!(q0.request(99, 0, &[], 512).0, S_UNSUPP, "unknown type");
    assert_eq!(
        q0.request(T_IN, DISK / 512, &[], 512).0,
        S_IOERR,
        "read past the end"
    );
    assert_eq!(
        q0.request(T_OUT, DISK / 512 - 1, &[7; 1024], 0).0,
        S_IOERR,
        "write past the end"
    );
    assert_eq!(
        q0.seg(T_WRITE_ZEROES, DISK, 512, 0),
        S_IOERR,
        "zeroes past the end"
    );
    assert_eq!(
        q0.seg(T_DISCARD, 0, CLUSTER, 0x8000),
        S_UNSUPP,
        "unknown discard flag"
    );
    if let Some(id) = serial_expected {
        let (st, _, got) = q0.request(T_GET_ID, 0, &[], 20);
        assert_eq!(st, S_OK);
        assert_eq!(&got[..id.len()], id.as_bytes());
    }
    // The queues split the disk; each runs on its own thread.
    let span = DISK / u64::from(nq);
    let mut model = vec![0u8; DISK as usize];
    std::thread::scope(|s| {
        for (q, (vq, part)) in c
            .queues
            .iter_mut()
            .zip(model.chunks_mut(span as usize))
            .enumerate()
        {
            s.spawn(move || exercise(vq, span * q as u64, span, 0x9e37_79b9 + q as u64, part));
        }
    });
    model
}

fn make_disk(d: &Path, name: &str) {
    ok(d, "qemu-img", &["create", "-q", "-f", "qcow2", name, "16M"]);
}

fn raw_content(d: &Path, name: &str) -> Vec<u8> {
    let raw = format!("{name}.raw");
    ok(d, "qemu-img", &["convert", "-O", "raw", name, &raw]);
    std::fs::read(d.join(raw)).unwrap()
}

fn run_against_qsd(nq: u16, opts: &Opts) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_disk(d, "q.qcow2");
    let sock = d.join("q.sock");
    let export = format!(
        "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path={},writable=on,num-queues={nq}",
        sock.display()
    );
    let srv = Served::start(
        d,
        "qemu-storage-daemon",
        &[
            "--blockdev",
            "driver=file,node-name=f,filename=q.qcow2,discard=unmap",
            "--blockdev",
            "driver=qcow2,node-name=disk,file=f,discard=unmap",
            "--export",
            &export,
        ],
        &sock,
    );
    let model = drive(&sock, nq, opts, None);
    let (_code, log) = srv.stop();
    assert!(
        raw_content(d, "q.qcow2") == model,
        "qsd image differs from the model: {log}"
    );
    ok(d, "qemu-img", &["check", "q.qcow2"]);
}

fn run_against_ours(nq: u16, opts: &Opts) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_disk(d, "o.qcow2");
    let sock = d.join("o.sock");
    let nqs = nq.to_string();
    let srv = Served::start(
        d,
        BIN,
        &[
            "serve",
            "--vhost-user-blk",
            "--socket",
            sock.to_str().unwrap(),
            "--num-queues",
            &nqs,
            "--serial",
            "qcow2kit-test",
            "o.qcow2",
        ],
        &sock,
    );
    let model = drive(&sock, nq, opts, Some("qcow2kit-test"));
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "serve exit code: {log}");
    assert!(!sock.exists(), "socket removed on stop");
    assert!(
        raw_content(d, "o.qcow2") == model,
        "our image differs from the model: {log}"
    );
    ok(d, "qemu-img", &["check", "o.qcow2"]);
}

#[test]
fn client_is_valid_against_qemu_storage_daemon() {
    if !have(
        &["qemu-img", "qemu-storage-daemon"],
        "vhost-user client vs qsd",
    ) {
        return;
    }
    for opts in [Opts::plain(), Opts::all()] {
        run_against_qsd(1, &opts);
        run_against_qsd(2, &opts);
    }
}

#[test]
fn one_queue_content_matches_model_and_checks_clean() {
    if !have(&["qemu-img"], "vhost-user-blk one queue") {
        return;
    }
    run_against_ours(1, &Opts::plain());
}

/// One queue with EVENT_IDX and indirect descriptors negotiated, requests
/// split over several descriptors (header and status sharing descriptors
/// with data), in indirect tables, and across the two guest memory regions
/// (the bounce path).
#[test]
fn one_queue_ring_features_and_layouts() {
    if !have(&["qemu-img"], "vhost-user-blk one queue, ring features") {
        return;
    }
    run_against_ours(1, &Opts::all());
}

#[test]
fn two_queues_content_matches_model_and_checks_clean() {
    if !have(&["qemu-img"], "vhost-user-blk two queues") {
        return;
    }
    run_against_ours(2, &Opts::plain());
}

/// Two queues with every ring feature and layout of
/// `one_queue_ring_features_and_layouts`.
#[test]
fn two_queues_ring_features_and_layouts() {
    if !have(&["qemu-img"], "vhost-user-blk two queues, ring features") {
        return;
    }
    run_against_ours(2, &Opts::all());
}

#[test]
fn read_only_export_refuses_writes() {
    if !have(&["qemu-img"], "vhost-user-blk read-only") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_disk(d, "r.qcow2");
    ok(d, "qemu-io", &["-c", "write -P 0x5a 0 64k", "r.qcow2"]);
    let sock = d.join("r.sock");
    let srv = Served::start(
        d,
        BIN,
        &[
            "serve",
            "--vhost-user-blk",
            "--socket",
            sock.to_str().unwrap(),
            "--read-only",
            "r.qcow2",
        ],
        &sock,
    );
    let mut c = connect(&sock, 1);
    assert_ne!(c.features & F_RO, 0, "RO offered");
    assert_eq!(c.features & (F_DISCARD | F_WRITE_ZEROES), 0);
    let q = &mut c.queues[0];
    assert_eq!(q.read(0, 4096), vec![0x5a; 4096]);
    assert_eq!(q.request(T_OUT, 0, &[1; 512], 0).0, S_IOERR);
    assert_eq!(q.seg(T_WRITE_ZEROES, 0, 512, 0), S_IOERR);
    assert_eq!(q.read(0, 512), vec![0x5a; 512]);
    drop(c);
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    ok(d, "qemu-img", &["check", "r.qcow2"]);
}

fn make_lazy(d: &Path, name: &str) {
    ok(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            name,
            "16M",
        ],
    );
}

fn serve_ours(d: &Path, sock: &Path, extra: &[&str], file: &str) -> Served {
    let mut args = vec![
        "serve",
        "--vhost-user-blk",
        "--socket",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(file);
    Served::start(d, BIN, &args, sock)
}

/// Connects and disconnects are logged; SIGTERM with a front-end still
/// connected (its last write not flushed) stops the server with exit 0, the
/// lazy-refcounts image closed clean (dirty bit cleared), holding every
/// completed write, and checking clean.
#[test]
fn sigterm_with_front_end_connected_leaves_a_clean_image() {
    if !have(&["qemu-img", "qemu-io"], "vhost-user-blk sigterm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_lazy(d, "l.qcow2");
    let sock = d.join("l.sock");
    let srv = serve_ours(d, &sock, &[], "l.qcow2");
    let mut c = connect(&sock, 1);
    c.queues[0].write(0, &[0x5a; 65536]);
    drop(c);
    srv.wait_log("front-end 1 disconnected");
    let mut c = connect(&sock, 1);
    c.queues[0].write(1 << 20, &[0xa5; 65536]);
    let (code, log) = srv.stop();
    drop(c);
    assert_eq!(code, 0, "{log}");
    for line in [
        "serving vhost-user-blk on ",
        "front-end 1 connected",
        "front-end 1 disconnected",
        "front-end 2 connected",
        "stopped",
    ] {
        assert!(log.contains(line), "log lacks {line:?}: {log}");
    }
    assert!(!sock.exists(), "socket removed on stop");
    let hdr = std::fs::read(d.join("l.qcow2")).unwrap();
    assert_eq!(hdr[79] & 1, 0, "dirty bit cleared on a clean stop");
    ok(d, "qemu-img", &["check", "l.qcow2"]);
    let r = ok(
        d,
        "qemu-io",
        &[
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0xa5 1M 64k",
            "l.qcow2",
        ],
    );
    assert!(!r.contains("fail"), "{r}");
}

/// A request the driver made available but whose kick no worker picked up
/// before SIGTERM is in flight too: the server finishes it (used ring
/// updated, data in the image) before it closes the image.
#[test]
fn sigterm_finishes_requests_made_available_but_not_yet_kicked() {
    if !have(&["qemu-img", "qemu-io"], "vhost-user-blk sigterm drain") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_lazy(d, "l.qcow2");
    let sock = d.join("l.sock");
    let srv = serve_ours(d, &sock, &[], "l.qcow2");
    let mut c = connect(&sock, 1);
    c.queues[0].write(0, &[0x5a; 65536]);
    let q = &mut c.queues[0];
    let posted = q.post(T_OUT, (2 << 20) / 512, &[0xc3; 65536], 0);
    assert!(!q.used_yet(), "not kicked, so not served yet");
    let (code, log) = srv.stop();
    assert_eq!(code, 0, "{log}");
    assert!(q.used_yet(), "the available request was served on SIGTERM");
    let (st, _, _) = q.complete(posted);
    assert_eq!(st, S_OK);
    drop(c);
    ok(d, "qemu-img", &["check", "l.qcow2"]);
    let r = ok(
        d,
        "qemu-io",
        &[
            "-c",
            "read -P 0x5a 0 64k",
            "-c",
            "read -P 0xc3 2M 64k",
            "l.qcow2",
        ],
    );
    assert!(!r.contains("fail"), "{r}");
}

/// `-q` logs nothing, and SIGINT stops like SIGTERM; SIGKILL after a
/// flushed write and an unflushed one leaves a lazy-refcounts image that
/// opens (repaired on the read-write open), holds the flushed data and
/// checks clean.
#[test]
fn sigint_quiet_and_sigkill() {
    if !have(&["qemu-img"], "vhost-user-blk sigint/sigkill") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_lazy(d, "k.qcow2");
    let sock = d.join("k.sock");
    let srv = serve_ours(d, &sock, &["-q"], "k.qcow2");
    let mut c = connect(&sock, 1);
    c.queues[0].write(2 << 20, &[0x66; 65536]);
    drop(c);
    let (code, log) = srv.stop_with("-INT");
    assert_eq!((code, log.as_str()), (0, ""), "quiet and clean on SIGINT");
    let hdr = std::fs::read(d.join("k.qcow2")).unwrap();
    assert_eq!(hdr[79] & 1, 0, "dirty bit cleared on SIGINT");

    let srv = serve_ours(d, &sock, &["-q"], "k.qcow2");
    let mut c = connect(&sock, 1);
    let q = &mut c.queues[0];
    q.write(0, &[0x77; 65536]);
    assert_eq!(q.request(T_FLUSH, 0, &[], 0).0, S_OK);
    q.write(1 << 20, &[0x88; 65536]);
    srv.kill();
    drop(c);
    let r = Command::new(BIN)
        .args([
            "io",
            "-c",
            "read -P 0x77 0 64k",
            "-c",
            "read -P 0x66 2M 64k",
            "k.qcow2",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!out.contains("fail"), "{out}");
    ok(d, "qemu-img", &["check", "k.qcow2"]);
}
