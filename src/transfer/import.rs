//! Import: an archive read from any `Read` recreated as committed
//! snapshots.

use std::io::{BufReader, Read};
use std::path::PathBuf;

use tracing::{debug, warn};

use super::archive::{
    ArchiveMeta, Content, END_ENTRY, LayerMeta, MAX_META_SIZE, META_ENTRY, Trailer, decompressor,
    split_layer_path,
};
use super::entry::read_error;
use super::native::{self, Receiver};
use super::tree::SnapshotTree;
use super::unpack::Unpacker;
use super::{IMPORT_NAMESPACE, instance_tag, sweep_leftovers, unique_tag};
use crate::error::{Error, Result};
use crate::model::{Kind, Labels, truncate_for_message, validate_key};
use crate::snapshotter::Snapshotter;

/// Imports the archive read from `input`; the last snapshot is named `key`
/// (default: its name in the archive). Returns that name. On any error
/// nothing this import created is left.
pub fn import<R: Read + Send>(core: &Snapshotter, input: R, key: Option<&str>) -> Result<String> {
    sweep_leftovers(core);
    native::sweep_staging(core, &instance_tag(core));
    let reader = decompressor(BufReader::with_capacity(1 << 20, input))?;
    let mut archive = tar::Archive::new(reader);
    let mut entries = archive.entries().map_err(read_error)?;

    let meta = {
        let mut first = entries
            .next()
            .ok_or_else(|| Error::InvalidArgument("the archive has no entry".into()))?
            .map_err(read_error)?;
        if first.path_bytes().as_ref() != META_ENTRY.as_bytes() {
            return Err(Error::InvalidArgument(format!(
                "not a cowsnap archive: the first entry is not {META_ENTRY}"
            )));
        }
        ArchiveMeta::parse(&read_small(&mut first)?)?
    };
    let names = check_names(core, &meta, key)?;

    let mut job = Job {
        core,
        meta: &meta,
        names: &names,
        tag: unique_tag(core),
        done: Vec::new(),
        current: None,
        entries: 0,
    };
    let result = match job.run(&mut entries) {
        Ok(trailer) => {
            // Read to the end of the compressed stream, so its checksum is
            // verified before the last layer is committed.
            std::io::copy(&mut archive.into_inner(), &mut std::io::sink())
                .map_err(read_error)
                .and_then(|_| job.finish_archive(&trailer))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => Ok(names[names.len() - 1].clone()),
        Err(e) => {
            job.roll_back();
            Err(e)
        }
    }
}

/// The name each layer gets; fails, before anything is written, if one is
/// taken or the first layer's parent is missing.
fn check_names(core: &Snapshotter, meta: &ArchiveMeta, key: Option<&str>) -> Result<Vec<String>> {
    let mut names: Vec<String> = meta.layers.iter().map(|l| l.key.clone()).collect();
    if let Some(k) = key.filter(|k| !k.is_empty()) {
        validate_key("key", k)?;
        let last = names.len() - 1;
        if names[..last].iter().any(|n| n == k) {
            return Err(Error::InvalidArgument(format!(
                "key {} is also the name of an ancestor in the archive",
                truncate_for_message(k)
            )));
        }
        names[last] = k.to_owned();
    }
    for n in &names {
        match core.stat(n) {
            Ok(_) => {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {}",
                    truncate_for_message(n)
                )));
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    let first = &meta.layers[0];
    if first.needs_parent() {
        let missing = || {
            Error::FailedPrecondition(format!(
                "the archive is incremental from snapshot {}, which is not here \
                 (import that snapshot first, or export with --chain)",
                truncate_for_message(&first.parent)
            ))
        };
        let parent = core.meta.get(&first.parent)?.ok_or_else(missing)?;
        if parent.kind != Kind::Committed {
            return Err(missing());
        }
        let path = PathBuf::from(core.backend.location(&parent.object, Kind::Committed));
        if !native::has_identity(&path, &first.native_parent_uuid)? {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {} here is not the one the archive is incremental from \
                 (it was not received from the same btrfs subvolume)",
                truncate_for_message(&first.parent)
            )));
        }
    }
    Ok(names)
}

/// A layer being imported.
enum Current {
    /// Unpacking into the active snapshot `key`.
    Tree {
        n: usize,
        key: String,
        tree: SnapshotTree,
        unpacker: Unpacker,
    },
    /// Receiving a btrfs stream.
    Native { n: usize, receiver: Receiver },
}

impl Current {
    fn layer(&self) -> usize {
        match self {
            Current::Tree { n, .. } | Current::Native { n, .. } => *n,
        }
    }
}

struct Job<'a> {
    core: &'a Snapshotter,
    meta: &'a ArchiveMeta,
    names: &'a [String],
    tag: String,
    /// Names committed so far, in order.
    done: Vec<String>,
    current: Option<Current>,
    entries: u64,
}

impl Job<'_> {
    /// Applies the layers' entries up to the trailer, whose contents it
    /// returns; the last layer is left for [`Job::finish_archive`].
    fn run<R: Read>(&mut self, entries: &mut tar::Entries<'_, R>) -> Result<Vec<u8>> {
        for entry in entries {
            let mut entry = entry.map_err(read_error)?;
            let path = entry.path_bytes().into_owned();
            if path == END_ENTRY.as_bytes() {
                return read_small(&mut entry);
            }
            let Some((n, inner)) = split_layer_path(&path) else {
                return Err(Error::InvalidArgument(format!(
                    "unexpected archive entry {:?}",
                    String::from_utf8_lossy(&path)
                )));
            };
            let current = self.current.as_ref().map(Current::layer);
            if current != Some(n) {
                let next = current.map_or(0, |c| c + 1);
                if n != next || n >= self.meta.layers.len() {
                    return Err(Error::InvalidArgument(format!(
                        "archive entry {:?} is out of order (expected layer {next})",
                        String::from_utf8_lossy(&path)
                    )));
                }
                self.finish_layer()?;
                self.start_layer(n)?;
            }
            self.entries += 1;
            match self.current.as_mut() {
                Some(Current::Tree { unpacker, .. }) => unpacker.apply(&mut entry, inner)?,
                Some(Current::Native { receiver, .. }) => receiver.feed(inner, &mut entry)?,
                None => return Err(Error::Internal("import: no current layer".into())),
            }
        }
        Err(Error::InvalidArgument(
            "the archive is truncated: it ends before its trailer".into(),
        ))
    }

    fn finish_archive(&mut self, trailer: &[u8]) -> Result<()> {
        let trailer: Trailer = serde_json::from_slice(trailer)
            .map_err(|e| Error::InvalidArgument(format!("archive trailer is not valid: {e}")))?;
        let layers = self.current.as_ref().map_or(0, |c| c.layer() + 1);
        if trailer.layers != self.meta.layers.len() as u64
            || layers != self.meta.layers.len()
            || trailer.entries != self.entries
        {
            return Err(Error::InvalidArgument(format!(
                "the archive is incomplete: {layers} of {} layers and {} of {} entries read",
                self.meta.layers.len(),
                self.entries,
                trailer.entries
            )));
        }
        self.finish_layer()
    }

    fn layer(&self, n: usize) -> &LayerMeta {
        &self.meta.layers[n]
    }

    /// The parent layer `n` is created on.
    fn parent_of(&self, n: usize) -> String {
        match n {
            0 if self.layer(0).needs_parent() => self.layer(0).parent.clone(),
            0 => String::new(),
            _ => self.names[n - 1].clone(),
        }
    }

    fn start_layer(&mut self, n: usize) -> Result<()> {
        let layer = self.layer(n);
        self.current = Some(match layer.content {
            Content::BtrfsSend if !self.core.backend.btrfs_send() => {
                return Err(Error::Unimplemented(format!(
                    "layer {n} is a btrfs-send stream, which needs the btrfs backend, and this \
                     daemon runs on {}: export it as tar",
                    self.core.backend.describe()
                )));
            }
            Content::BtrfsSend => Current::Native {
                n,
                receiver: Receiver::start(self.core.root(), &format!("{}-{n}", self.tag))?,
            },
            Content::Tree | Content::Diff => {
                let key = format!("{IMPORT_NAMESPACE}{}-{n}", self.tag);
                let mounts = self.core.prepare(&key, &self.parent_of(n), Labels::new())?;
                let opened = SnapshotTree::new(self.core, &mounts, &format!("{}-{n}", self.tag))
                    .and_then(|tree| {
                        let unpacker =
                            Unpacker::new(tree.path(), n, layer.content == Content::Diff)?;
                        Ok((tree, unpacker))
                    });
                match opened {
                    Ok((tree, unpacker)) => Current::Tree {
                        n,
                        key,
                        tree,
                        unpacker,
                    },
                    Err(e) => {
                        self.remove(&key);
                        return Err(e);
                    }
                }
            }
        });
        Ok(())
    }

    fn finish_layer(&mut self) -> Result<()> {
        let Some(current) = self.current.take() else {
            return Ok(());
        };
        let n = current.layer();
        let name = self.names[n].clone();
        let labels = self.layer(n).labels.clone();
        match current {
            Current::Tree {
                key,
                tree,
                unpacker,
                ..
            } => {
                let finished = unpacker.finish();
                drop(tree);
                let committed = finished.and_then(|_| self.core.commit(&name, &key, labels, ""));
                if let Err(e) = committed {
                    self.remove(&key);
                    return Err(e);
                }
            }
            Current::Native { receiver, .. } => {
                let staging = receiver.staging().to_owned();
                let adopted = receiver.finish().and_then(|subvol| {
                    let staged = subvol.to_str().ok_or_else(|| {
                        Error::Internal(format!("{} is not UTF-8", subvol.display()))
                    })?;
                    self.core
                        .adopt_committed(&name, &self.parent_of(n), labels, staged)
                });
                native::remove_staging(self.core, &staging);
                adopted?;
            }
        }
        debug!(name = %truncate_for_message(&name), layer = n, "imported");
        self.done.push(name);
        Ok(())
    }

    /// Removes everything this import created: the layer in progress, then
    /// the committed layers, newest first.
    fn roll_back(&mut self) {
        match self.current.take() {
            Some(Current::Tree {
                key,
                tree,
                unpacker,
                ..
            }) => {
                // The unpacker holds directories of the tree open: closed
                // first, or a mounted tree (ZFS) stays busy and neither
                // unmounts nor can be destroyed.
                drop(unpacker);
                drop(tree);
                self.remove(&key);
            }
            Some(Current::Native { receiver, .. }) => {
                let staging = receiver.staging().to_owned();
                receiver.abort();
                native::remove_staging(self.core, &staging);
            }
            None => {}
        }
        while let Some(name) = self.done.pop() {
            self.remove(&name);
        }
    }

    fn remove(&self, key: &str) {
        if let Err(e) = self.core.remove(key) {
            warn!(key = %truncate_for_message(key), error = %e, "import: could not remove a snapshot of a failed import");
        }
    }
}

/// Reads a metadata-sized entry.
fn read_small<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Vec<u8>> {
    if entry.size() > MAX_META_SIZE {
        return Err(Error::InvalidArgument(format!(
            "archive metadata entry of {} bytes is too large",
            entry.size()
        )));
    }
    let mut buf = Vec::with_capacity(usize::try_from(entry.size()).unwrap_or(0));
    entry.read_to_end(&mut buf).map_err(read_error)?;
    Ok(buf)
}
