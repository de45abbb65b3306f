//! Export: a committed snapshot (and optionally its ancestors) to an
//! archive written to any `Write`.

use std::io::Write;
use std::path::PathBuf;

use tar::{Builder, EntryType, Header};
use tracing::{debug, warn};

use super::archive::{
    ArchiveMeta, Compression, Compressor, Content, END_ENTRY, FORMAT_NAME, FORMAT_VERSION,
    LayerMeta, META_ENTRY, Trailer,
};
use super::pack::{pack_layer, sink_error};
use super::tree::SnapshotTree;
use super::{EXPORT_NAMESPACE, Format, native, unique_tag};
use crate::error::{Error, Result};
use crate::meta::Record;
use crate::model::{Kind, Labels, Timestamp, truncate_for_message};
use crate::snapshotter::Snapshotter;

/// What to export and how.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// The snapshot: a name, an id or a unique id prefix.
    pub reference: String,
    /// Also export every ancestor, parent first, each as a diff from the
    /// one before (tar) or an incremental stream (btrfs-send).
    pub chain: bool,
    /// btrfs-send only: send the snapshot as an incremental stream from its
    /// parent, which the importing side must already hold.
    pub incremental: bool,
    /// Tar or native.
    pub format: Format,
    /// zstd or gzip.
    pub compression: Compression,
}

/// An export whose snapshots are resolved and pinned by views; the views
/// are removed when it is dropped.
pub struct Export<'c> {
    core: &'c Snapshotter,
    opts: ExportOptions,
    /// The snapshots to write, parent first.
    layers: Vec<(String, Record)>,
    /// The parent of an incremental stream.
    base: Option<Record>,
    /// Views held, with their trees (tar: one per layer; btrfs-send: one).
    views: Vec<(String, Option<SnapshotTree>)>,
}

/// Resolves and checks what `opts` asks for and takes the views; errors
/// here are the request's (not found, not committed, bad options).
pub fn begin_export<'c>(core: &'c Snapshotter, opts: ExportOptions) -> Result<Export<'c>> {
    super::sweep_leftovers(core);
    let (key, record) = core.resolve(&opts.reference)?;
    if record.kind != Kind::Committed {
        return Err(Error::FailedPrecondition(format!(
            "snapshot {} is {} {}: only committed snapshots can be exported",
            truncate_for_message(&key),
            if record.kind == Kind::Active {
                "an"
            } else {
                "a"
            },
            record.kind
        )));
    }
    if opts.incremental {
        if opts.format != Format::BtrfsSend {
            return Err(Error::InvalidArgument(
                "--incremental needs --format btrfs-send: a tar diff could not be checked against \
                 the importing side's parent (use --chain to carry the ancestors)"
                    .into(),
            ));
        }
        if opts.chain {
            return Err(Error::InvalidArgument(
                "--incremental and --chain exclude each other".into(),
            ));
        }
    }
    let base = match (&record.parent, opts.incremental) {
        (Some(p), true) => Some(core.meta.get(p)?.ok_or_else(|| {
            Error::NotFound(format!("parent snapshot {}", truncate_for_message(p)))
        })?),
        (None, true) => {
            return Err(Error::InvalidArgument(format!(
                "snapshot {} has no parent to be incremental from",
                truncate_for_message(&key)
            )));
        }
        _ => None,
    };
    // After the checks of the request itself.
    if opts.format == Format::BtrfsSend && !core.backend.btrfs_send() {
        return Err(Error::Unimplemented(format!(
            "the btrfs-send format needs the btrfs backend, and this daemon runs on {}: \
             export as tar",
            core.backend.describe()
        )));
    }
    let mut layers = vec![(key, record)];
    if opts.chain {
        while let Some(p) = layers[0].1.parent.clone() {
            let r = core
                .meta
                .get(&p)?
                .ok_or_else(|| Error::NotFound(format!("ancestor {}", truncate_for_message(&p))))?;
            layers.insert(0, (p, r));
        }
    }
    let mut export = Export {
        core,
        opts,
        layers,
        base,
        views: Vec::new(),
    };
    // Views pin the snapshots (a snapshot with a child cannot be removed)
    // and give tar exports the trees to read.
    let tag = unique_tag(core);
    let pinned: Vec<String> = match export.opts.format {
        Format::Tar => export.layers.iter().map(|(k, _)| k.clone()).collect(),
        Format::BtrfsSend => vec![export.layers[export.layers.len() - 1].0.clone()],
    };
    for (i, target) in pinned.iter().enumerate() {
        let view_key = format!("{EXPORT_NAMESPACE}{tag}-{i}");
        let mounts = core.view(&view_key, target, Labels::new())?;
        export.views.push((view_key, None));
        if export.opts.format == Format::Tar {
            let tree = SnapshotTree::new(core, &mounts, &format!("{tag}-{i}"))?;
            if let Some(last) = export.views.last_mut() {
                last.1 = Some(tree);
            }
        }
    }
    Ok(export)
}

/// Exports as `opts` says into `out`; returns the number of tar entries of
/// the layers. Convenience for [`begin_export`] + [`Export::write`].
pub fn export<W: Write>(core: &Snapshotter, opts: ExportOptions, out: W) -> Result<u64> {
    begin_export(core, opts)?.write(out)
}

impl Export<'_> {
    /// Writes the archive into `out` and removes the views.
    pub fn write<W: Write>(self, out: W) -> Result<u64> {
        let metas = self.layer_metas()?;
        let compressor = Compressor::new(out, self.opts.compression).map_err(sink_error)?;
        let mut builder = Builder::new(compressor);
        let meta = ArchiveMeta {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            created: Timestamp::now(),
            writer: format!("cowsnap {}", env!("CARGO_PKG_VERSION")),
            layers: metas,
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::Internal(format!("encoding archive metadata: {e}")))?;
        append_small(&mut builder, META_ENTRY, &json)?;

        let mut entries = 0;
        for i in 0..self.layers.len() {
            entries += match self.opts.format {
                Format::Tar => {
                    let tree = self.tree(i)?;
                    let parent = if i > 0 { Some(self.tree(i - 1)?) } else { None };
                    pack_layer(&mut builder, i, tree, parent)?
                }
                Format::BtrfsSend => {
                    let path = self.committed_path(&self.layers[i].1);
                    let parent = match (i, &self.base) {
                        (0, Some(b)) => Some(self.committed_path(b)),
                        (0, None) => None,
                        _ => Some(self.committed_path(&self.layers[i - 1].1)),
                    };
                    native::send_layer(&mut builder, i, &path, parent.as_deref())?
                }
            };
        }
        let trailer = Trailer {
            layers: self.layers.len() as u64,
            entries,
        };
        let json = serde_json::to_vec(&trailer)
            .map_err(|e| Error::Internal(format!("encoding archive trailer: {e}")))?;
        append_small(&mut builder, END_ENTRY, &json)?;
        let compressor = builder.into_inner().map_err(sink_error)?;
        let mut out = compressor.finish().map_err(sink_error)?;
        out.flush().map_err(sink_error)?;
        debug!(
            snapshot = %truncate_for_message(&self.layers[self.layers.len() - 1].0),
            layers = self.layers.len(), entries, format = self.opts.format.as_str(),
            "exported"
        );
        Ok(entries)
    }

    fn tree(&self, i: usize) -> Result<&std::path::Path> {
        self.views
            .get(i)
            .and_then(|(_, t)| t.as_ref())
            .map(SnapshotTree::path)
            .ok_or_else(|| Error::Internal(format!("export: no tree for layer {i}")))
    }

    fn committed_path(&self, record: &Record) -> PathBuf {
        PathBuf::from(self.core.backend.location(&record.object, Kind::Committed))
    }

    fn layer_metas(&self) -> Result<Vec<LayerMeta>> {
        let mut out = Vec::with_capacity(self.layers.len());
        for (i, (key, r)) in self.layers.iter().enumerate() {
            let native = self.opts.format == Format::BtrfsSend;
            let content = match (native, i) {
                (true, _) => Content::BtrfsSend,
                (false, 0) => Content::Tree,
                (false, _) => Content::Diff,
            };
            let (native_uuid, native_parent_uuid) = if native {
                let own = native::send_identity(&self.committed_path(r))?;
                let parent = match (i, &self.base) {
                    (0, Some(b)) => native::send_identity(&self.committed_path(b))?,
                    (0, None) => String::new(),
                    _ => native::send_identity(&self.committed_path(&self.layers[i - 1].1))?,
                };
                (own, parent)
            } else {
                (String::new(), String::new())
            };
            out.push(LayerMeta {
                key: key.clone(),
                labels: r.labels.clone(),
                parent: r.parent.clone().unwrap_or_default(),
                created: r.created,
                usage: r.usage.unwrap_or_default(),
                native,
                content,
                native_uuid,
                native_parent_uuid,
            });
        }
        Ok(out)
    }
}

impl Drop for Export<'_> {
    fn drop(&mut self) {
        for (key, tree) in self.views.drain(..).rev() {
            drop(tree);
            if let Err(e) = self.core.remove(&key) {
                warn!(key = %key, error = %e, "could not remove an export view");
            }
        }
    }
}

/// Appends a small file entry (metadata, trailer).
fn append_small<W: Write>(builder: &mut Builder<W>, name: &str, data: &[u8]) -> Result<()> {
    let mut h = Header::new_gnu();
    h.set_entry_type(EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(u64::try_from(Timestamp::now().secs).unwrap_or(0));
    builder.append_data(&mut h, name, data).map_err(sink_error)
}
