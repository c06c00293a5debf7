//! [`FileResolver`]: how an image reaches the other files it names (its
//! backing files and its external data file) when the embedder, not the
//! file system, decides what a name means.

use crate::error::Result;
use crate::storage::Storage;
use std::fmt;
use std::sync::Arc;

/// What a file named by an image is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileRole {
    /// A backing file (opened read-only).
    Backing,
    /// The external data file (`data_file`), opened like the image.
    DataFile,
}

/// Opens the files an image names, for embedders that hand out storages
/// themselves: a sandboxed VMM that receives file descriptors, an image
/// chain kept in memory or behind another transport. Given to
/// [`OpenOptions::file_resolver`](crate::OpenOptions::file_resolver), it
/// replaces both the file system lookup (relative names, the directory of the
/// image) and the [backing policy](crate::options::BackingPolicy): whatever
/// it returns is used, and an error it returns fails the open.
///
/// Loops in a backing chain are detected by storage identity (the same
/// `Arc` returned twice), and the chain depth is bounded by
/// [`MAX_BACKING_DEPTH`](crate::image::MAX_BACKING_DEPTH), as for files.
///
/// ```
/// use qcow2kit::image::{FileResolver, FileRole};
/// use qcow2kit::storage::{MemStorage, Storage};
/// use qcow2kit::{CreateOptions, Error, Image, OpenOptions};
/// use std::collections::HashMap;
/// use std::sync::Arc;
///
/// /// Names resolve to storages made in memory.
/// #[derive(Debug)]
/// struct InMemory(HashMap<String, Arc<dyn Storage>>);
///
/// impl FileResolver for InMemory {
///     fn open(&self, _role: FileRole, name: &str, _writable: bool) -> qcow2kit::Result<Arc<dyn Storage>> {
///         self.0.get(name).cloned().ok_or_else(|| Error::InvalidArgument(format!("no file {name}")))
///     }
/// }
///
/// # fn main() -> qcow2kit::Result<()> {
/// let base: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// qcow2kit::create::create_on(base.clone(), &CreateOptions::new(), 1 << 20)?;
/// Image::open_storage(base.clone(), &OpenOptions::new())?.write_at(b"from the base", 0)?;
///
/// let top: Arc<dyn Storage> = Arc::new(MemStorage::new());
/// let opts = CreateOptions::new().backing_file("base").backing_fmt("qcow2");
/// qcow2kit::create::create_on(top.clone(), &opts, 1 << 20)?;
///
/// let files = InMemory(HashMap::from([("base".to_string(), base)]));
/// let img = Image::open_storage(top, &OpenOptions::new().file_resolver(Arc::new(files)))?;
/// let mut buf = [0u8; 13];
/// img.read_at(&mut buf, 0)?;
/// assert_eq!(&buf, b"from the base");
/// # Ok(())
/// # }
/// ```
pub trait FileResolver: Send + Sync + fmt::Debug {
    /// Opens the file the image names `name` (exactly as stored in the
    /// header, or as given with the `data-file` option) for `role`,
    /// writable or not.
    ///
    /// # Errors
    /// Whatever makes the file unavailable; the open of the image fails with
    /// it (wrapped in [`Error::Backing`](crate::Error::Backing) or
    /// [`Error::DataFile`](crate::Error::DataFile)).
    fn open(&self, role: FileRole, name: &str, writable: bool) -> Result<Arc<dyn Storage>>;
}

/// An optional resolver carried by [`crate::OpenOptions`]; equal when it is
/// the same resolver.
#[derive(Clone, Default)]
pub(crate) struct ResolverHandle(pub(crate) Option<Arc<dyn FileResolver>>);

impl fmt::Debug for ResolverHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(r) => write!(f, "Some({r:?})"),
            None => f.write_str("None"),
        }
    }
}

impl PartialEq for ResolverHandle {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for ResolverHandle {}

/// The identity of a storage returned by a resolver (its data pointer).
pub(crate) fn storage_id(s: &Arc<dyn Storage>) -> usize {
    Arc::as_ptr(s).cast::<()>() as usize
}
