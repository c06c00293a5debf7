//! Workloads and their offset sequences: identical for every engine, computed
//! from a fixed seed, so every engine sees the same requests in the same order.

/// Virtual disk size of every image.
pub const DISK: u64 = 1 << 30;
/// Cluster size of every qcow2 image.
pub const CLUSTER: u64 = 64 << 10;
/// Stride of the strided-read workload: one 4 KiB L2 slice maps 512 clusters
/// (32 MiB), and a 64 KiB L2 cache holds 16 slices, so cycling over the 32
/// slices of a 1 GiB disk misses on every read (LRU) in qemu and in qcow2kit.
pub const STRIDE: u64 = 32 << 20;
/// Length of a precomputed random sequence (cycled when a run is longer).
const RAND_LEN: usize = 1 << 18;

/// What a workload does to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Reads of the fully allocated image.
    Read,
    /// In-place overwrites of the fully allocated image.
    Overwrite,
    /// Writes into an empty image (fresh copy per run).
    Alloc,
}

/// The order of the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// `k * bs mod DISK`: what `qemu-img bench` issues with its default step.
    Seq,
    /// Uniformly random `bs`-aligned offsets.
    Rand,
    /// `k * STRIDE mod DISK` (`qemu-img bench -S`).
    Strided,
    /// Every cluster once, in random order, at a random 4 KiB slot inside it:
    /// every request allocates a cluster.
    ClusterPerm,
}

/// One workload of the table.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Short name (command-line and table key).
    pub name: &'static str,
    /// Table label.
    pub label: &'static str,
    /// Request size.
    pub bs: usize,
    /// Reads, overwrites or allocating writes.
    pub kind: Kind,
    /// Request order.
    pub pattern: Pattern,
    /// Open with `l2-cache-size=64k`.
    pub small_l2: bool,
}

/// All workloads, in table order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "seq-read",
        label: "4K sequential read",
        bs: 4096,
        kind: Kind::Read,
        pattern: Pattern::Seq,
        small_l2: false,
    },
    Workload {
        name: "rand-read",
        label: "4K random read",
        bs: 4096,
        kind: Kind::Read,
        pattern: Pattern::Rand,
        small_l2: false,
    },
    Workload {
        name: "seq-read-64k",
        label: "64K sequential read",
        bs: 65536,
        kind: Kind::Read,
        pattern: Pattern::Seq,
        small_l2: false,
    },
    Workload {
        name: "strided-read",
        label: "4K strided read, 64K L2 cache",
        bs: 4096,
        kind: Kind::Read,
        pattern: Pattern::Strided,
        small_l2: true,
    },
    Workload {
        name: "seq-overwrite",
        label: "4K sequential overwrite",
        bs: 4096,
        kind: Kind::Overwrite,
        pattern: Pattern::Seq,
        small_l2: false,
    },
    Workload {
        name: "rand-overwrite",
        label: "4K random overwrite",
        bs: 4096,
        kind: Kind::Overwrite,
        pattern: Pattern::Rand,
        small_l2: false,
    },
    Workload {
        name: "seq-alloc",
        label: "4K sequential allocating write",
        bs: 4096,
        kind: Kind::Alloc,
        pattern: Pattern::Seq,
        small_l2: false,
    },
    Workload {
        name: "rand-alloc",
        label: "4K random allocating write",
        bs: 4096,
        kind: Kind::Alloc,
        pattern: Pattern::ClusterPerm,
        small_l2: false,
    },
];

/// Looks a workload up by name.
pub fn workload(name: &str) -> Option<Workload> {
    WORKLOADS.iter().copied().find(|w| w.name == name)
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` (one per thread).
    pub fn new(stream: u64) -> Self {
        Rng(0x9e37_79b9_7f4a_7c15 ^ stream.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The offsets of one request stream.
pub enum Offsets {
    /// `start + k * step mod DISK`.
    Linear { step: u64 },
    /// A precomputed list, cycled.
    List(Vec<u64>),
}

impl Offsets {
    /// The stream of workload `w` for thread `t` of `threads`.
    pub fn new(w: &Workload, t: usize, threads: usize) -> Offsets {
        match w.pattern {
            Pattern::Seq => Offsets::Linear { step: w.bs as u64 },
            Pattern::Strided => Offsets::Linear { step: STRIDE },
            Pattern::Rand => {
                let mut rng = Rng::new(t as u64 + 1);
                let blocks = DISK / w.bs as u64;
                Offsets::List(
                    (0..RAND_LEN)
                        .map(|_| (rng.next() % blocks) * w.bs as u64)
                        .collect(),
                )
            }
            Pattern::ClusterPerm => {
                // One permutation for everybody; thread t takes every
                // threads-th entry, so threads never allocate the same cluster.
                let all = cluster_perm();
                Offsets::List(all.into_iter().skip(t).step_by(threads).collect())
            }
        }
    }

    /// The `k`-th offset.
    #[inline]
    pub fn get(&self, k: usize) -> u64 {
        match self {
            Offsets::Linear { step } => (k as u64).wrapping_mul(*step) % DISK,
            Offsets::List(v) => v[k % v.len()],
        }
    }

    /// Number of distinct requests before the stream repeats (for one pass of
    /// an allocating workload).
    pub fn pass_len(&self, bs: usize) -> usize {
        match self {
            Offsets::Linear { step } => (DISK / (*step).max(bs as u64)) as usize,
            Offsets::List(v) => v.len(),
        }
    }
}

/// Every cluster of the disk once, shuffled, each at a random 4 KiB slot.
pub fn cluster_perm() -> Vec<u64> {
    let n = (DISK / CLUSTER) as usize;
    let mut rng = Rng::new(0xa110c);
    let mut v: Vec<u64> = (0..n as u64).collect();
    for i in (1..n).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v.into_iter()
        .map(|c| c * CLUSTER + (rng.next() % (CLUSTER / 4096)) * 4096)
        .collect()
}
