//! The archive format (docs/transfer.md): names of the tar entries, the JSON
//! metadata entry and the trailer, and the compression around the tar stream.
//!
//! An archive is one tar stream compressed with zstd or gzip. Its first entry
//! is [`META_ENTRY`] (an [`ArchiveMeta`]), then the layers in parent→child
//! order, each under `layers/<n>/`, then the [`END_ENTRY`] trailer, whose
//! presence is how an importer knows the archive is complete.

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{Labels, Timestamp, Usage, validate_key, validate_labels};

/// Name of the first entry: the archive's metadata.
pub const META_ENTRY: &str = "cowsnap-export.json";
/// Name of the last entry: the trailer.
pub const END_ENTRY: &str = "cowsnap-export.end";
/// Value of [`ArchiveMeta::format`].
pub const FORMAT_NAME: &str = "cowsnap-export";
/// The version this code writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Directory of the layers inside the archive.
pub const LAYERS_DIR: &str = "layers";
/// Largest metadata or trailer entry accepted (keys and labels are bounded
/// by the core's limits; this is far above them).
pub const MAX_META_SIZE: u64 = 64 * 1024 * 1024;

/// How a layer's content is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Content {
    /// The full tree of the snapshot as tar entries.
    Tree,
    /// The differences from the previous layer as tar entries, deletions as
    /// OCI whiteouts (`.wh.<name>`).
    Diff,
    /// A `btrfs send` stream of the snapshot's subvolume, split into
    /// entries `btrfs-send.<seq>`; incremental when `native_parent_uuid`
    /// is set.
    BtrfsSend,
}

/// One snapshot in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The snapshot's name where it was exported.
    pub key: String,
    /// Its labels.
    #[serde(default)]
    pub labels: Labels,
    /// Its parent's name where it was exported ("" for none). An importer
    /// needs it only for an incremental btrfs-send layer (see
    /// [`LayerMeta::needs_parent`]); after the first layer it is always the
    /// previous layer.
    #[serde(default)]
    pub parent: String,
    /// When it was committed where it was exported.
    pub created: Timestamp,
    /// Its usage where it was exported (for information: the importer
    /// measures its own).
    #[serde(default)]
    pub usage: Usage,
    /// Whether the content is a filesystem's native stream.
    #[serde(default)]
    pub native: bool,
    /// How the content is stored.
    pub content: Content,
    /// btrfs-send: the UUID the stream's subvolume is known by (its received
    /// UUID if it has one, else its own), hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub native_uuid: String,
    /// btrfs-send, incremental: the UUID the stream expects its parent to be
    /// known by on the receiving side, hex; empty for a full stream.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub native_parent_uuid: String,
}

impl LayerMeta {
    /// True when importing this layer, as the first of the archive, needs its
    /// parent to exist already on the importing side.
    pub fn needs_parent(&self) -> bool {
        self.content == Content::BtrfsSend && !self.native_parent_uuid.is_empty()
    }
}

/// The first entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveMeta {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// When the archive was written.
    pub created: Timestamp,
    /// The cowsnap version that wrote it.
    #[serde(default)]
    pub writer: String,
    /// The snapshots, parent first; the last one is the one exported.
    pub layers: Vec<LayerMeta>,
}

impl ArchiveMeta {
    /// Parses and checks the metadata entry of an archive.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let meta: ArchiveMeta = serde_json::from_slice(bytes).map_err(|e| {
            Error::InvalidArgument(format!("archive metadata ({META_ENTRY}) is not valid: {e}"))
        })?;
        if meta.format != FORMAT_NAME {
            return Err(Error::InvalidArgument(format!(
                "not a cowsnap archive: metadata format is {:?}",
                meta.format
            )));
        }
        if meta.version != FORMAT_VERSION {
            return Err(Error::InvalidArgument(format!(
                "archive format version {} is not supported (this cowsnap reads version {FORMAT_VERSION})",
                meta.version
            )));
        }
        if meta.layers.is_empty() {
            return Err(Error::InvalidArgument("archive holds no snapshot".into()));
        }
        for (i, layer) in meta.layers.iter().enumerate() {
            validate_key("archive snapshot key", &layer.key)?;
            validate_labels(&layer.labels)?;
            let native = layer.content == Content::BtrfsSend;
            if layer.native != native {
                return Err(Error::InvalidArgument(format!(
                    "archive layer {i}: native={} does not match content {:?}",
                    layer.native, layer.content
                )));
            }
            if i == 0 && layer.content == Content::Diff && !layer.parent.is_empty() {
                return Err(Error::InvalidArgument(
                    "archive layer 0 is a diff from a parent the archive does not carry".into(),
                ));
            }
            if i > 0 && layer.content == Content::Tree {
                return Err(Error::InvalidArgument(format!(
                    "archive layer {i}: only the first layer can be a full tree"
                )));
            }
            if i > 0 && layer.parent != meta.layers[i - 1].key {
                return Err(Error::InvalidArgument(format!(
                    "archive layer {i}: parent {:?} is not the previous layer {:?}",
                    layer.parent,
                    meta.layers[i - 1].key
                )));
            }
        }
        let mut keys: Vec<&str> = meta.layers.iter().map(|l| l.key.as_str()).collect();
        keys.sort_unstable();
        if keys.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument(
                "archive names one snapshot twice".into(),
            ));
        }
        Ok(meta)
    }
}

/// The last entry of an archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Number of layers written.
    pub layers: u64,
    /// Number of tar entries written in the layers.
    pub entries: u64,
}

/// The tar path prefix of layer `n`.
pub fn layer_prefix(n: usize) -> String {
    format!("{LAYERS_DIR}/{n}")
}

/// Splits an entry path into (layer number, path inside the layer as raw
/// bytes, possibly empty for the layer's root). None if the path is not
/// under `layers/`.
pub fn split_layer_path(path: &[u8]) -> Option<(usize, &[u8])> {
    let rest = path
        .strip_prefix(LAYERS_DIR.as_bytes())?
        .strip_prefix(b"/")?;
    let (num, inner) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    if num.is_empty() || (num.len() > 1 && num[0] == b'0') || !num.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some((n, inner))
}

/// Checks a path inside a layer and returns its components: no absolute
/// path, no `.` or `..` or empty component (a trailing `/` is allowed).
pub fn components(inner: &[u8]) -> Result<Vec<&[u8]>> {
    let trimmed = inner.strip_suffix(b"/").unwrap_or(inner);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&[u8]> = trimmed.split(|&b| b == b'/').collect();
    for p in &parts {
        if p.is_empty() || *p == b"." || *p == b".." {
            return Err(Error::InvalidArgument(format!(
                "archive entry path {:?} is not a plain relative path",
                String::from_utf8_lossy(inner)
            )));
        }
    }
    Ok(parts)
}

/// Compression around the tar stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// zstd (level 3, with a frame checksum).
    #[default]
    Zstd,
    /// gzip (default level).
    Gzip,
}

impl Compression {
    /// The name used on the command line and in documentation.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        }
    }
}

/// A compressing writer; [`Compressor::finish`] writes the end of the
/// compressed stream.
pub enum Compressor<W: Write> {
    /// zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
    /// gzip.
    Gzip(flate2::write::GzEncoder<W>),
}

impl<W: Write> Compressor<W> {
    /// Starts a compressed stream into `out`.
    pub fn new(out: W, compression: Compression) -> io::Result<Self> {
        Ok(match compression {
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(out, 3)?;
                // A checksum per frame: a damaged archive fails to
                // decompress instead of importing wrong bytes.
                enc.include_checksum(true)?;
                Compressor::Zstd(enc)
            }
            Compression::Gzip => Compressor::Gzip(flate2::write::GzEncoder::new(
                out,
                flate2::Compression::default(),
            )),
        })
    }

    /// Ends the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Gzip(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Gzip(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Gzip(e) => e.flush(),
        }
    }
}

/// Opens a decompressing reader over `input`, recognising zstd or gzip by
/// their magic numbers.
pub fn decompressor<'a, R: BufRead + Send + 'a>(mut input: R) -> Result<Box<dyn Read + Send + 'a>> {
    let head = input
        .fill_buf()
        .map_err(|e| Error::InvalidArgument(format!("reading the archive: {e}")))?;
    if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let dec = zstd::stream::read::Decoder::with_buffer(input)
            .map_err(|e| Error::InvalidArgument(format!("reading the archive (zstd): {e}")))?;
        Ok(Box::new(dec))
    } else if head.starts_with(&[0x1f, 0x8b]) {
        // MultiGzDecoder: gzip allows several members back to back.
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(input)))
    } else if head.is_empty() {
        Err(Error::InvalidArgument("the archive is empty".into()))
    } else {
        Err(Error::InvalidArgument(
            "not a cowsnap archive: neither zstd nor gzip compressed".into(),
        ))
    }
}

/// Lowercase hex of a UUID (empty for the all-zero UUID).
pub fn uuid_hex(uuid: &[u8; 16]) -> String {
    if uuid.iter().all(|&b| b == 0) {
        return String::new();
    }
    uuid.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(key: &str, parent: &str, content: Content) -> LayerMeta {
        LayerMeta {
            key: key.into(),
            labels: Labels::new(),
            parent: parent.into(),
            created: Timestamp { secs: 1, nanos: 2 },
            usage: Usage::default(),
            native: content == Content::BtrfsSend,
            content,
            native_uuid: String::new(),
            native_parent_uuid: String::new(),
        }
    }

    fn meta(layers: Vec<LayerMeta>) -> Vec<u8> {
        serde_json::to_vec(&ArchiveMeta {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            created: Timestamp { secs: 3, nanos: 0 },
            writer: "test".into(),
            layers,
        })
        .unwrap()
    }

    #[test]
    fn metadata_round_trips_and_checks_the_chain() {
        let ok = meta(vec![
            layer("a", "", Content::Diff),
            layer("b", "a", Content::Diff),
        ]);
        assert_eq!(ArchiveMeta::parse(&ok).unwrap().layers.len(), 2);
        let broken = meta(vec![
            layer("a", "", Content::Diff),
            layer("b", "x", Content::Diff),
        ]);
        assert!(ArchiveMeta::parse(&broken).is_err());
        let tree_on_top = meta(vec![
            layer("a", "", Content::Diff),
            layer("b", "a", Content::Tree),
        ]);
        assert!(ArchiveMeta::parse(&tree_on_top).is_err());
        let twice = meta(vec![
            layer("a", "", Content::Diff),
            layer("a", "a", Content::Diff),
        ]);
        assert!(ArchiveMeta::parse(&twice).is_err());
        assert!(ArchiveMeta::parse(&meta(vec![])).is_err());
        assert!(ArchiveMeta::parse(b"{").is_err());
    }

    #[test]
    fn only_parent_dependent_layers_need_a_parent() {
        assert!(!layer("a", "p", Content::Tree).needs_parent());
        assert!(!layer("a", "", Content::Diff).needs_parent());
        let orphan_diff = meta(vec![layer("a", "p", Content::Diff)]);
        assert!(ArchiveMeta::parse(&orphan_diff).is_err());
        let mut send = layer("a", "p", Content::BtrfsSend);
        assert!(!send.needs_parent());
        send.native_parent_uuid = "00ff".into();
        assert!(send.needs_parent());
    }

    #[test]
    fn layer_paths_split_and_reject_escapes() {
        assert_eq!(split_layer_path(b"layers/0"), Some((0, &b""[..])));
        assert_eq!(split_layer_path(b"layers/12/a/b"), Some((12, &b"a/b"[..])));
        assert_eq!(split_layer_path(b"layers/01/a"), None);
        assert_eq!(split_layer_path(b"other/1/a"), None);
        assert_eq!(split_layer_path(b"layers/x/a"), None);
        assert_eq!(components(b"a/b/").unwrap(), vec![&b"a"[..], &b"b"[..]]);
        assert!(components(b"").unwrap().is_empty());
        assert!(components(b"a/../b").is_err());
        assert!(components(b"/a").is_err());
        assert!(components(b"a//b").is_err());
        assert!(components(b"./a").is_err());
    }

    #[test]
    fn compressed_streams_are_recognised() {
        for c in [Compression::Zstd, Compression::Gzip] {
            let mut w = Compressor::new(Vec::new(), c).unwrap();
            w.write_all(b"hello archive").unwrap();
            let bytes = w.finish().unwrap();
            let mut out = String::new();
            decompressor(&bytes[..])
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            assert_eq!(out, "hello archive");
        }
        assert!(decompressor(&b"plain text"[..]).is_err());
        assert!(decompressor(&b""[..]).is_err());
    }
}
