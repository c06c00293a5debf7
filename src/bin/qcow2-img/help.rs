//! Every `--help` text of `qcow2-img` (`qcow2-img --help` and
//! `qcow2-img SUB --help`), in the spirit of qemu-img 10's: a synopsis, a
//! line on what the command does, each option explained, and the exit
//! codes. Only the options our parsers accept are listed. `io --help` lives
//! in `io.rs` (qemu-io's text); `check --help` in the library's check CLI,
//! which `qcow2-check` shares.

/// `qcow2-img --help`: the commands, one line each.
pub const MAIN: &str = "\
Usage: qcow2-img [-h | -V] COMMAND [COMMAND OPTIONS]
QEMU disk image utility for qcow2 images (qcow2kit)

Commands:
  amend    change header options (compat, refcount_bits, size, ...) of an image
  bench    run a simple read or write benchmark on an image
  bitmap   add, remove, clear, enable, disable or merge persistent dirty bitmaps
  check    check an image for consistency and optionally repair it
  commit   copy an image's data into its backing file (or a deeper base)
  compare  compare the guest contents of two images
  convert  copy an image's guest data (through its backing chain) to a new image
  create   create a new qcow2 image, optionally over a backing file
  info     show information about an image (and its backing chain)
  io       run qemu-io commands (read, write, discard, ...) on an image
  map      show where an image's guest data is and which layer holds it
  measure  compute the file size a new image would need
  mirror   copy an image's guest data to a new image (drive-mirror)
  rebase   change an image's backing file, keeping (or not: -u) what it reads
  resize   grow or shrink an image's virtual size
  serve    export an image to other processes (--nbd: an NBD server)
  snapshot list, create, apply or delete internal snapshots
  stream   copy the data of an image's backing chain into it (block-stream)

Options:
  -h, --help
      print this help and exit
  -V, --version
      print the version and exit

Run 'qcow2-img COMMAND --help' for a command's options and exit codes.
";

/// `qcow2-img measure --help`.
pub const MEASURE: &str = "\
Usage: qcow2-img measure [--object OBJECTDEF]... [--output human|json] [-O raw|qcow2]
                         [-o OPTS]... [-U] (--size SIZE | [-f qcow2|raw | --image-opts] FILE)

Print the file size a new image of format -O would need: `required size` (right
after creating it, or after converting FILE into it) and `fully allocated size`
(every cluster allocated); for a qcow2 target of compat=1.1 measured from a
qcow2 FILE also `bitmaps size` (the space of FILE's persistent bitmaps).

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  --output human|json
      output format (default human)
  -O raw|qcow2
      format of the new image (default raw)
  -o, --options OPTS
      creation options of the new image as key=value[,key=value...]; may be
      repeated; for qcow2 cluster_size, extended_l2, refcount_bits, compat,
      preallocation, backing_file and encrypt.format=luks (its LUKS header,
      sized for encrypt.cipher-alg/encrypt.cipher-mode; encrypt.key-secret
      must name a secret) count
  --size SIZE
      measure an empty image of SIZE bytes (suffixes k, M, G, T, P, E)
  -f, --format qcow2|raw
      format of FILE (default qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      driver=qcow2,file.filename=disk.qcow2,encrypt.key-secret=sec0
  -U, --force-share
      open FILE in shared mode

Arguments:
  FILE
      the image whose conversion is measured (with its backing chain)

Exit codes:
  0  the sizes were printed
  1  error: bad argument or option, or FILE cannot be opened
";

/// `qcow2-img compare --help`.
pub const COMPARE: &str = "\
Usage: qcow2-img compare [-f FMT] [-F FMT] [--image-opts] [-T SRC_CACHE] [-s] [-p]
                         [-q] [-U] FILE1 FILE2

Compare the guest contents of two images (through their backing chains).
Unallocated and zero ranges equal zeroes; a size difference is a warning when
the larger image's tail reads as zeroes.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f FMT, -F FMT
      format of FILE1 and FILE2: qcow2 or raw (default: probed)
  --image-opts
      FILE1 and FILE2 are option strings instead of file names, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f or -F
  -T SRC_CACHE
      cache mode for both images (default writeback)
  -s
      strict: a size difference or a different allocation (data, zeroes,
      unallocated) is a mismatch too
  -p
      print qemu-img's progress indicator on stdout
  -q
      print nothing
  -U, --force-share
      open the images in shared mode

Arguments:
  FILE1, FILE2
      the images to compare

Exit codes:
  0  the images are identical
  1  the images differ, or a bad argument
  2  an image cannot be opened
  3  a block status query failed
  4  a read failed
";

/// `qcow2-img create --help`.
pub const CREATE: &str = "\
Usage: qcow2-img create -f qcow2 [-o OPTS]... [-b BACKING [-F BACKING_FMT]] [-u] [-q]
                        FILE [SIZE]

Create a new qcow2 image. Prints a 'Formatting ...' line naming its options.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of the new image: required, and qcow2 is the only one
  -o, --options OPTS
      creation options as key=value[,key=value...] (write a comma inside a
      value as ',,'); may be repeated; '-o help' lists the options
  -b, --backing BACKING
      make the new image a copy-on-write overlay of BACKING (a relative name
      is taken relative to FILE's directory)
  -F, --backing-format BACKING_FMT
      format of BACKING (qcow2 or raw); required with -b unless -u is given
  -u, --backing-unsafe
      do not open BACKING: it need not exist, and neither its format nor its
      size is checked or read, so SIZE must be given
  -q, --quiet
      do not print the 'Formatting ...' line

Arguments:
  FILE
      the image file to create (an existing file is overwritten)
  SIZE
      virtual size in bytes, with an optional suffix b, k, M, G, T, P or E
      (1024-based); required unless BACKING is opened (then its size is used)

Exit codes:
  0  the image was created, or '-o help' listed the options
  1  error: bad argument or option, BACKING cannot be opened, or the image
     cannot be created (a partly written file is removed)
";

/// `qcow2-img info --help`.
pub const INFO: &str = "\
Usage: qcow2-img info [-f qcow2 | --image-opts] [--output human|json]
                      [--backing-chain] [-U] FILE

Show information about an image: virtual and disk size, cluster size, backing
file, format-specific details.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  --output human|json
      output format (default human)
  --backing-chain
      also show every image of the backing chain, top first (with --output
      json: an array)
  -U, --force-share
      open the image in shared mode, so an image another process holds can
      be read (no lock conflict)

Arguments:
  FILE
      the image file

Exit codes:
  0  the information was printed
  1  error: bad argument, or an image of the chain cannot be opened
";

/// `qcow2-img map --help`.
pub const MAP: &str = "\
Usage: qcow2-img map [-f qcow2 | --image-opts] [--output human|json] [-s OFFSET]
                     [-l LENGTH] [-U] [-B BITMAP] FILE

Show how the guest data of an image is stored: for each run of guest bytes,
whether it is data or zeroes, which layer of the backing chain holds it, and
at which host offset of which file. With -B, show instead which guest bytes
the persistent dirty bitmap BITMAP marks dirty.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  --output human|json
      output format (default human)
  -s, --start-offset OFFSET
      start at this guest offset (default 0; suffixes k, M, G ... allowed)
  -l, --max-length LENGTH
      map at most LENGTH bytes (default: up to the end of the image)
  -U, --force-share
      open the images in shared mode, so an image another process holds can
      be read (no lock conflict)
  -B, --bitmap BITMAP
      map the dirty bitmap BITMAP of FILE (what an incremental backup copies):
      human output lists the dirty runs (offset, length); JSON lists every
      run as { \"start\", \"length\", \"dirty\": true|false }

Arguments:
  FILE
      the image file

Exit codes:
  0  the map was printed
  1  error: bad argument, an image cannot be opened or its metadata read, no
     such bitmap or an inconsistent one
";

/// `qcow2-img convert --help`.
pub const CONVERT: &str = "\
Usage: qcow2-img convert [--object OBJECTDEF]... [-f qcow2|raw | --image-opts]
                         [-T SRC_CACHE] [-U] [-O raw|qcow2] [-o OPTS]...
                         [-t TGT_CACHE] [-c] [-p] [-q] [-m NUM] [-W]
                         [--bitmaps [--skip-broken-bitmaps]] SRC DST

Copy the guest data of SRC, read through its backing chain, into a new image
DST. Only ranges that hold non-zero data are written, so DST is sparse.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2|raw
      format of SRC (default: qcow2; a raw SRC needs -f raw)
  --image-opts
      SRC is an option string (driver=qcow2,file.filename=...,
      encrypt.key-secret=ID for an encrypted SRC)
  -T SRC_CACHE
      cache mode for SRC: none, off, writeback, unsafe, directsync or
      writethrough (default writeback)
  -U, --force-share
      open SRC in shared mode, so an image another process holds can be read
      (no lock conflict)
  -O raw|qcow2
      format of DST (default raw)
  -o, --options OPTS
      creation options of DST as key=value[,key=value...]; may be repeated;
      with -O raw only size, nocow and preallocation are accepted; DST always
      has the size of SRC (size= is checked but does not change it);
      encrypt.format=luks,encrypt.key-secret=ID,... encrypts DST
  -t TGT_CACHE
      cache mode for DST, values as for -T (default unsafe: no syncs at all)
  -c, --compress
      write every cluster with data compressed (compression_type of DST:
      zlib or zstd), as qemu-img does; clusters that do not compress are
      written plainly and all-zero clusters not at all; only with -O qcow2.
      Compression runs on several threads, writes stay in guest order
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -q, --quiet
      print no progress (convert prints nothing else on success anyway)
  -m NUM
      number of parallel copy requests: accepted for compatibility, ignored
  -W
      out-of-order writes: accepted for compatibility, ignored
  --bitmaps
      also copy SRC's persistent dirty bitmaps (names, granularity, enabled or
      not, bits) into DST (a qcow2 v3 image); an inconsistent one stops the
      conversion before DST is created
  --skip-broken-bitmaps
      with --bitmaps: skip inconsistent bitmaps (with a warning) instead

Arguments:
  SRC
      the image to copy from
  DST
      the image file to create (an existing file is overwritten)

Exit codes:
  0  the data was copied
  1  error: bad argument, SRC cannot be opened or read, or DST cannot be
     created or written
";

/// `qcow2-img resize --help`.
pub const RESIZE: &str = "\
Usage: qcow2-img resize [-f qcow2 | --image-opts] [-q] [--preallocation=MODE] [--shrink]
                        FILE [+|-]SIZE

Change the virtual size of an image. Prints 'Image resized.' on success.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  -q, --quiet
      do not print 'Image resized.'
  --preallocation=MODE
      how to allocate the added area when growing: off (default), metadata,
      falloc or full
  --shrink
      allow a size smaller than the current one; the data beyond the new
      end is lost

Arguments:
  FILE
      the image file
  [+|-]SIZE
      the new size, or with + or - the amount to grow or shrink by; an
      optional suffix b, k, M, G, T, P or E (1024-based); always the last
      argument, so -1M is a size, not an option

Exit codes:
  0  the image has the new size
  1  error: bad argument, the image cannot be opened, a shrink without
     --shrink, or the resize failed
";

/// `qcow2-img commit --help`.
pub const COMMIT: &str = "\
Usage: qcow2-img commit [-f qcow2] [-q] [-d] [-p] [-b BASE] [-r RATE] FILE

Copy the data allocated in FILE (and in the images between FILE and BASE)
into BASE, then empty FILE so that it reads through to BASE again. Prints
'Image committed.' on success.

Options:
  -h, --help
      print this help and exit
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  -q, --quiet
      print nothing (no progress either)
  -d
      do not empty FILE afterwards
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -b BASE
      the image of FILE's backing chain that receives the data (found by file
      identity; default: FILE's backing file); implies -d
  -r RATE
      copy at most RATE bytes per second (suffixes k, M, G, ...; 0: no limit)

Arguments:
  FILE
      the image to commit (opened read-write)

Exit codes:
  0  the image was committed
  1  error: bad argument, the image or BASE cannot be opened, BASE is not in
     FILE's backing chain, FILE has no backing file, or an I/O error
";

/// `qcow2-img rebase --help`.
pub const REBASE: &str = "\
Usage: qcow2-img rebase [-f qcow2] [-q] [-p] [-U] [-u] [-b NEW [-F FMT]] FILE

Change FILE's backing file to NEW. Safe mode (the default) first copies into
FILE every range where the old and the new backing file read differently, so
FILE's guest view does not change; -u only rewrites the backing file name.
NEW empty (-b \"\") removes the backing file (safe mode first copies in all
backing data). Prints nothing on success (with -p: the progress indicator).

Options:
  -h, --help
      print this help and exit
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  -q, --quiet
      print nothing (no progress either)
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -U, --force-share
      open NEW with force-share=on (another process may hold it)
  -u
      unsafe mode: only change the name in the header; neither backing file is
      opened and nothing is copied (without -b: remove the backing file)
  -b NEW
      the new backing file, relative to FILE's directory unless absolute
  -F FMT
      the format of NEW, written into FILE's header (qcow2 or raw to be opened;
      required with a non-empty NEW)

Arguments:
  FILE
      the image to rebase (opened read-write)

Exit codes:
  0  the backing file was changed
  1  error: bad argument, FILE or NEW cannot be opened, no -F with -b NEW, the
     name does not fit in the header, or an I/O error
";

/// `qcow2-img stream --help`.
pub const STREAM: &str = "\
Usage: qcow2-img stream [-f qcow2] [-q] [-p] [-b BASE] [--backing-file STR] [-r RATE] FILE

Copy into FILE the data its backing chain holds above BASE (default: all of
it), then make BASE its backing file (named as FILE's chain opened it, as
QEMU does, or STR; with BASE's format), or, without BASE, remove its backing
file. FILE reads the same
before and after. QEMU's block-stream job, offline. Prints nothing on success
(with -p: the progress indicator).

Options:
  -h, --help
      print this help and exit
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  -q, --quiet
      print nothing (no progress either)
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -b BASE
      the image of FILE's backing chain that stays its backing file (found by
      file identity)
  --backing-file STR
      the backing file name written into FILE instead of BASE (not checked);
      needs -b
  -r RATE
      copy at most RATE bytes per second (suffixes k, M, G, ...; 0: no limit)

Arguments:
  FILE
      the image to stream into (opened read-write)

Exit codes:
  0  the data was streamed
  1  error: bad argument, the image cannot be opened, BASE is not in FILE's
     backing chain, --backing-file without -b, or an I/O error
";

/// `qcow2-img mirror --help`.
pub const MIRROR: &str = "\
Usage: qcow2-img mirror [-q] [-p] [-O qcow2|raw] [--on-source-error=POLICY]
                        [--on-target-error=POLICY] SRC TARGET

Create TARGET with SRC's virtual size and copy SRC's guest data (through its
whole backing chain) into it with the mirror job (QEMU's drive-mirror,
sync=full); TARGET has no backing file. Prints nothing on success (with -p:
the progress indicator).

Options:
  -h, --help
      print this help and exit
  -q, --quiet
      print nothing (no progress either)
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -O qcow2|raw
      format of TARGET (default: qcow2, created with default options)
  --on-source-error=report|ignore|stop|enospc
      what an error reading SRC does (QEMU's on-source-error; default:
      report): report ends the mirror with the error, ignore retries the
      chunk later (forever if the error persists), stop ends it too (nobody
      can resume an offline job: the job is cancelled and the error says it
      stopped), enospc is stop for ENOSPC and report for anything else
  --on-target-error=report|ignore|stop|enospc
      the same for an error writing or flushing TARGET (QEMU's
      on-target-error; default: report)

Arguments:
  SRC
      the image to copy (opened read-only, with its backing chain)
  TARGET
      the new image (replaced if it exists)

Exit codes:
  0  TARGET holds SRC's guest data
  1  error: bad argument, SRC cannot be opened, TARGET cannot be created, or an
     I/O error (reported, or stopped on; TARGET is then incomplete)
";

/// `qcow2-img amend --help`.
pub const AMEND: &str = "\
Usage: qcow2-img amend [-f qcow2 | --image-opts] [-p] [-q] -o OPTS... FILE

Change header options of an existing image in place. Prints nothing on
success (with -p: the progress indicator only).

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  -p, --progress
      print qemu-img's progress indicator on stdout: updates of the form
      (PERCENT/100%), each ended by a carriage return, and a newline at the end
  -q, --quiet
      print no progress (amend prints nothing else on success anyway)
  -o OPTS
      the options to change, as key=value[,key=value...]: compat,
      lazy_refcounts, refcount_bits, size, backing_file, backing_fmt,
      data_file, data_file_raw; required, may be repeated

Arguments:
  FILE
      the image file (opened read-write)

Exit codes:
  0  the options were changed
  1  error: bad argument or option, the image cannot be opened, or the
     change failed
";

/// `qcow2-img snapshot --help`.
pub const SNAPSHOT: &str = "\
Usage: qcow2-img snapshot [-f qcow2 | --image-opts] [-q] [-U]
                          -l|-c NAME|-a NAME|-d NAME FILE

List, create, apply or delete the internal snapshots of an image. Only -l
prints anything (nothing when the image has no snapshots).

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  -q, --quiet
      accepted for qemu-img compatibility (the list is still printed)
  -U, --force-share
      open the image in shared mode (only with -l: a writable open refuses it)
  -l, --list
      list the snapshots (the default)
  -c, --create NAME
      create a snapshot of the current content named NAME (names need not be
      unique; the ID is the highest ID + 1)
  -a, --apply NAME
      make snapshot NAME the current content (NAME is an ID or, if no ID
      matches, a name)
  -d, --delete NAME
      delete the first snapshot named NAME

Arguments:
  FILE
      the image file

Exit codes:
  0  done
  1  error: bad argument, the image cannot be opened, no such snapshot, or
     the operation failed (a refcount width too small to share clusters
     refuses a snapshot and changes nothing)
";

/// `qcow2-img bitmap --help`.
pub const BITMAP: &str = "\
Usage: qcow2-img bitmap (--add | --remove | --clear | --enable | --disable |
                         --merge SOURCE [-b SOURCE_FILE [-F SOURCE_FMT]])...
                        [-f qcow2 | --image-opts] [-g GRANULARITY] FILE BITMAP

Change the persistent dirty bitmap BITMAP of FILE (a v3 qcow2 image). The
actions run in the order given; the first that fails stops the rest, but
what ran before it is kept. Prints nothing on success.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE (qcow2; raw images hold no bitmaps)
  --image-opts
      FILE is an option string instead of a file name, for example
      'driver=qcow2,encrypt.key-secret=ID,file.filename=disk.qcow2' (with
      --object, the key of an encrypted image); not with -f
  --add
      create BITMAP, enabled: it records the guest writes from now on
  -g, --granularity SIZE
      with --add: guest bytes per bit, a power of two from 512 to 2G
      (suffixes k, M, G); 0 or none: the cluster size within 4k..64k
  --remove
      delete BITMAP (also an inconsistent one, which nothing else accepts)
  --clear
      clear every bit of BITMAP
  --enable, --disable
      start or stop recording guest writes in BITMAP
  --merge SOURCE
      set every bit of BITMAP that bitmap SOURCE has set (granularities may
      differ, disk sizes may not)
  -b, --source-file SOURCE_FILE
      with --merge: take SOURCE from this image instead of FILE
  -F, --source-format SOURCE_FMT
      with -b: the format of SOURCE_FILE (probed when not given)

Arguments:
  FILE
      the image file
  BITMAP
      the bitmap's name

Exit codes:
  0  done
  1  error: bad argument, an image cannot be opened, or an action failed
     (no such bitmap, an inconsistent one, a name in use, a bad granularity)
";

/// `qcow2-img bench --help`.
pub const BENCH: &str = "\
Usage: qcow2-img bench [-f qcow2 | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]
                       [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-q]
                       [-w [--pattern=BYTE] [--flush-interval=N [--no-drain]]]
                       [-U] FILE

Run a simple benchmark: COUNT requests of BUFFER_SIZE bytes, DEPTH of them in
flight, then print how long it took.

Options:
  -h, --help
      print this help and exit
  --object OBJECTDEF
      a secret, secret,id=ID,data=STRING|file=PATH[,format=raw|base64], that
      encrypt.key-secret=ID names (the key of an encrypted image); may be
      repeated
  -f, --format qcow2
      format of FILE; only qcow2 is supported (default: qcow2)
  --image-opts
      FILE is an option string (for example
      'driver=qcow2,file.filename=disk.qcow2') instead of a file name; -f is
      then ignored
  -t, --cache CACHE
      cache mode: none, off, writeback, unsafe, directsync or writethrough
      (default writeback)
  -c, --count COUNT
      number of requests (default 75000)
  -d, --depth DEPTH
      number of requests in flight at once (default 64)
  -o, --offset OFFSET
      guest offset of the first request (default 0)
  -s, --buffer-size BUFFER_SIZE
      size of each request (default 4096; suffixes k, M ... allowed)
  -S, --step-size STEP_SIZE
      offset increment from one request to the next (default BUFFER_SIZE)
  -i, --aio AIO
      asynchronous I/O backend: accepted for compatibility, ignored
  -n, --native
      native AIO: accepted for compatibility, ignored
  -q, --quiet
      accepted for compatibility; like qemu-img, bench still prints
  -w, --write
      write instead of read (opens the image read-write)
  --pattern=BYTE
      byte value written by -w (0-255, default 0)
  --flush-interval=N
      with -w: flush after every N requests (N at least DEPTH)
  --no-drain
      with --flush-interval: flush without waiting for the requests in flight
  -U, --force-share
      open the image in shared mode, so an image another process holds can
      be used (no lock conflict)

Arguments:
  FILE
      the image file (or option string with --image-opts)

Exit codes:
  0  the benchmark ran
  1  error: bad argument, the image cannot be opened, or a request failed
";

/// Prints a help text on stdout.
pub fn print(text: &str) {
    print!("{text}");
}
