//! Writing a layer: a directory tree (or its differences from a parent
//! tree) as tar entries under `layers/<n>/`.
//!
//! Every entry carries mode, owner, mtime (nanoseconds in a pax `mtime`
//! record) and extended attributes (pax `SCHILY.xattr.<name>` records, as
//! GNU tar and star write them). Hard links are kept as tar link entries to
//! the first name written in the layer; files with holes are written in GNU
//! tar's pax 1.0 sparse format; symlink targets travel byte for byte in a
//! pax `linkpath` record. Sockets are skipped (tar cannot hold them).
//!
//! A diff walks the child tree and looks each path up in the parent tree:
//! an entry is unchanged when the parent has the same inode with the same
//! change time (btrfs and ZFS snapshots keep inode numbers and ctimes, and
//! every change to an inode moves its ctime). Deleted names become OCI
//! whiteouts (`.wh.<name>`). When any name of a hard-linked inode changes,
//! every name of it is written, so links survive the diff.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};
use tar::{Builder, EntryType, Header};

use super::archive::layer_prefix;
use crate::error::{Error, IoContext, Result};

/// OCI whiteout prefix: `.wh.<name>` deletes `<name>` from the layer below.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// pax record prefix of an extended attribute.
pub const PAX_XATTR: &str = "SCHILY.xattr.";

/// Writes the tree at `root` as layer `n`: the full tree when `parent` is
/// None, else its differences from the tree at `parent`. Returns the number
/// of entries written.
pub fn pack_layer<W: Write>(
    builder: &mut Builder<W>,
    n: usize,
    root: &Path,
    parent: Option<&Path>,
) -> Result<u64> {
    let mut dirty = HashSet::new();
    if parent.is_some() {
        // First pass: hard-linked inodes of which some name changed.
        walk(root, parent, &mut |ev| {
            if let Event::Other { md, parent, .. } = ev
                && md.nlink() > 1
                && changed(md, parent)
            {
                dirty.insert((md.dev(), md.ino()));
            }
            Ok(())
        })?;
    }
    let mut packer = Packer {
        builder,
        prefix: layer_prefix(n).into_bytes(),
        root,
        diff: parent.is_some(),
        links: HashMap::new(),
        dirty,
        entries: 0,
    };
    walk(root, parent, &mut |ev| packer.event(ev))?;
    Ok(packer.entries)
}

/// What the walk found.
enum Event<'a> {
    /// A directory (the root has an empty path), before its contents.
    Dir {
        rel: &'a [u8],
        md: &'a Metadata,
        parent: Option<&'a Metadata>,
    },
    /// A name of directory `dir` in the parent tree that the child lacks.
    Deleted { dir: &'a [u8], name: &'a [u8] },
    /// Anything but a directory.
    Other {
        rel: &'a [u8],
        md: &'a Metadata,
        parent: Option<&'a Metadata>,
    },
}

type Visit<'v> = dyn FnMut(Event<'_>) -> Result<()> + 'v;

/// Walks the tree at `root` depth first in name order, pairing each path
/// with the same path in `parent` (if any). Never follows symlinks.
fn walk(root: &Path, parent: Option<&Path>, f: &mut Visit<'_>) -> Result<()> {
    let md = fs::symlink_metadata(root).context(|| format!("stat {}", root.display()))?;
    let pmd = match parent {
        Some(p) => Some(fs::symlink_metadata(p).context(|| format!("stat {}", p.display()))?),
        None => None,
    };
    walk_dir(root, parent, &mut Vec::new(), &md, pmd.as_ref(), f)
}

fn walk_dir(
    root: &Path,
    parent: Option<&Path>,
    rel: &mut Vec<u8>,
    md: &Metadata,
    pmd: Option<&Metadata>,
    f: &mut Visit<'_>,
) -> Result<()> {
    f(Event::Dir {
        rel,
        md,
        parent: pmd,
    })?;
    let dir = join(root, rel);
    let names = sorted_names(&dir)?;
    // The parent's directory is only compared if it is one.
    let pdir = match (parent, pmd) {
        (Some(p), Some(m)) if m.is_dir() => Some(join(p, rel)),
        _ => None,
    };
    if let Some(pdir) = &pdir {
        let child: HashSet<&[u8]> = names.iter().map(Vec::as_slice).collect();
        for name in sorted_names(pdir)? {
            if !child.contains(name.as_slice()) {
                f(Event::Deleted {
                    dir: rel,
                    name: &name,
                })?;
            }
        }
    }
    for name in names {
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(&name);
        let path = join(root, rel);
        let cmd = fs::symlink_metadata(&path).context(|| format!("stat {}", path.display()))?;
        let cpmd = match &pdir {
            Some(pdir) => {
                let p = pdir.join(OsStr::from_bytes(&name));
                match fs::symlink_metadata(&p) {
                    Ok(m) => Some(m),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(Error::io(format!("stat {}", p.display()), e)),
                }
            }
            None => None,
        };
        if cmd.is_dir() {
            walk_dir(root, parent, rel, &cmd, cpmd.as_ref(), f)?;
        } else {
            f(Event::Other {
                rel,
                md: &cmd,
                parent: cpmd.as_ref(),
            })?;
        }
        rel.truncate(len);
    }
    Ok(())
}

fn join(root: &Path, rel: &[u8]) -> PathBuf {
    if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(rel))
    }
}

fn sorted_names(dir: &Path) -> Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("reading directory {}", dir.display()))? {
        let entry = entry.context(|| format!("reading directory {}", dir.display()))?;
        names.push(entry.file_name().as_bytes().to_vec());
    }
    names.sort_unstable();
    Ok(names)
}

/// Whether the child's entry differs from the parent's entry at the same
/// path (None: the parent has none).
fn changed(md: &Metadata, parent: Option<&Metadata>) -> bool {
    let Some(p) = parent else { return true };
    md.ino() != p.ino()
        || md.ctime() != p.ctime()
        || md.ctime_nsec() != p.ctime_nsec()
        || md.mtime() != p.mtime()
        || md.mtime_nsec() != p.mtime_nsec()
        || md.mode() != p.mode()
        || md.uid() != p.uid()
        || md.gid() != p.gid()
        || md.size() != p.size()
        || md.rdev() != p.rdev()
        || md.nlink() != p.nlink()
}

struct Packer<'a, W: Write> {
    builder: &'a mut Builder<W>,
    prefix: Vec<u8>,
    root: &'a Path,
    diff: bool,
    /// (dev, inode) of hard-linked entries written in this layer → their
    /// archive path.
    links: HashMap<(u64, u64), Vec<u8>>,
    /// Hard-linked inodes every name of which must be written.
    dirty: HashSet<(u64, u64)>,
    entries: u64,
}

impl<W: Write> Packer<'_, W> {
    fn event(&mut self, ev: Event<'_>) -> Result<()> {
        match ev {
            Event::Dir { rel, md, parent } => {
                self.check_name(rel)?;
                // The root always: it carries the tree's own mode and owner.
                if rel.is_empty() || changed(md, parent) {
                    self.write_entry(rel, md)?;
                }
            }
            Event::Deleted { dir, name } => {
                let mut rel = dir.to_vec();
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(WHITEOUT_PREFIX);
                rel.extend_from_slice(name);
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(0);
                h.set_mtime(0);
                let path = self.archive_path(&rel);
                self.builder
                    .append_data(&mut h, OsStr::from_bytes(&path), io::empty())
                    .map_err(sink_error)?;
                self.entries += 1;
            }
            Event::Other { rel, md, parent } => {
                self.check_name(rel)?;
                let key = (md.dev(), md.ino());
                if changed(md, parent) || (md.nlink() > 1 && self.dirty.contains(&key)) {
                    self.write_entry(rel, md)?;
                }
            }
        }
        Ok(())
    }

    /// A diff layer cannot hold a real file named like a whiteout.
    fn check_name(&self, rel: &[u8]) -> Result<()> {
        let name = rel.rsplit(|&b| b == b'/').next().unwrap_or(rel);
        if self.diff && name.starts_with(WHITEOUT_PREFIX) {
            return Err(Error::FailedPrecondition(format!(
                "{:?} cannot be exported as a diff: its name starts with .wh., which marks deletions \
                 in a layer (export without --chain)",
                String::from_utf8_lossy(rel)
            )));
        }
        Ok(())
    }

    fn archive_path(&self, rel: &[u8]) -> Vec<u8> {
        let mut p = self.prefix.clone();
        if !rel.is_empty() {
            p.push(b'/');
            p.extend_from_slice(rel);
        }
        p
    }

    fn write_entry(&mut self, rel: &[u8], md: &Metadata) -> Result<()> {
        let path = join(self.root, rel);
        let apath = self.archive_path(rel);
        let ft = md.file_type();
        if ft.is_socket() {
            tracing::debug!(path = %path.display(), "export: skipping a socket");
            return Ok(());
        }
        let key = (md.dev(), md.ino());
        if !ft.is_dir() && md.nlink() > 1 {
            if let Some(first) = self.links.get(&key) {
                let mut h = Header::new_gnu();
                h.set_entry_type(EntryType::Link);
                h.set_size(0);
                h.set_mode(md.mode() & 0o7777);
                h.set_uid(u64::from(md.uid()));
                h.set_gid(u64::from(md.gid()));
                h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
                self.builder
                    .append_link(&mut h, OsStr::from_bytes(&apath), OsStr::from_bytes(first))
                    .map_err(sink_error)?;
                self.entries += 1;
                return Ok(());
            }
            self.links.insert(key, apath.clone());
        }

        let mut h = Header::new_gnu();
        h.set_mode(md.mode() & 0o7777);
        h.set_uid(u64::from(md.uid()));
        h.set_gid(u64::from(md.gid()));
        h.set_mtime(u64::try_from(md.mtime()).unwrap_or(0));
        h.set_size(0);
        let mut pax: Vec<(String, Vec<u8>)> = vec![(
            "mtime".into(),
            format!("{}.{:09}", md.mtime(), md.mtime_nsec()).into_bytes(),
        )];
        for (name, value) in read_xattrs(&path)? {
            pax.push((format!("{PAX_XATTR}{name}"), value));
        }

        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            self.append(&mut h, &apath, &pax, io::empty())?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).context(|| format!("readlink {}", path.display()))?;
            let target = target.as_os_str().as_bytes();
            h.set_entry_type(EntryType::Symlink);
            // The header field is normalised by the tar crate and limited to
            // 100 bytes; the pax record keeps the target byte for byte.
            h.set_link_name_literal(&target[..target.len().min(100)])
                .map_err(sink_error)?;
            pax.push(("linkpath".into(), target.to_vec()));
            self.append(&mut h, &apath, &pax, io::empty())?;
        } else if ft.is_fifo() {
            h.set_entry_type(EntryType::Fifo);
            self.append(&mut h, &apath, &pax, io::empty())?;
        } else if ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            let rdev = md.rdev();
            let major = u32::try_from(nix::sys::stat::major(rdev)).unwrap_or(u32::MAX);
            let minor = u32::try_from(nix::sys::stat::minor(rdev)).unwrap_or(u32::MAX);
            h.set_device_major(major).map_err(sink_error)?;
            h.set_device_minor(minor).map_err(sink_error)?;
            self.append(&mut h, &apath, &pax, io::empty())?;
        } else {
            self.write_file(&mut h, &apath, &path, md, pax)?;
        }
        Ok(())
    }

    fn write_file(
        &mut self,
        h: &mut Header,
        apath: &[u8],
        path: &Path,
        md: &Metadata,
        mut pax: Vec<(String, Vec<u8>)>,
    ) -> Result<()> {
        h.set_entry_type(EntryType::Regular);
        let mut file = File::open(path).context(|| format!("open {}", path.display()))?;
        let size = md.size();
        let regions = data_regions(&file, size).context(|| format!("lseek {}", path.display()))?;
        // SEEK_DATA / SEEK_HOLE moved the offset.
        file.seek(io::SeekFrom::Start(0))
            .context(|| format!("lseek {}", path.display()))?;
        let data: u64 = regions.iter().map(|r| r.1).sum();
        if data == size {
            h.set_size(size);
            let reader = Exact {
                inner: file,
                remaining: size,
                path,
            };
            return self.append(h, apath, &pax, reader);
        }
        // pax 1.0 sparse (GNU tar): the data starts with the map (count,
        // then offset and length per region, one decimal a line) padded to a
        // block, then the regions' bytes.
        let mut map = format!("{}\n", regions.len());
        for (off, len) in &regions {
            map.push_str(&format!("{off}\n{len}\n"));
        }
        let mut map = map.into_bytes();
        map.resize(map.len().div_ceil(512) * 512, 0);
        h.set_size(map.len() as u64 + data);
        pax.push(("GNU.sparse.major".into(), b"1".to_vec()));
        pax.push(("GNU.sparse.minor".into(), b"0".to_vec()));
        pax.push(("GNU.sparse.name".into(), apath.to_vec()));
        pax.push(("GNU.sparse.realsize".into(), size.to_string().into_bytes()));
        let reader = io::Cursor::new(map).chain(Regions {
            file: &file,
            regions,
            index: 0,
            done: 0,
            path,
        });
        self.append(h, apath, &pax, reader)
    }

    fn append(
        &mut self,
        h: &mut Header,
        apath: &[u8],
        pax: &[(String, Vec<u8>)],
        data: impl Read,
    ) -> Result<()> {
        self.builder
            .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(sink_error)?;
        self.builder
            .append_data(h, OsStr::from_bytes(apath), data)
            .map_err(
                |e| match e.get_ref().and_then(|i| i.downcast_ref::<SourceError>()) {
                    Some(s) => Error::io(s.context.clone(), io::Error::from(e.kind())),
                    None => sink_error(e),
                },
            )?;
        self.entries += 1;
        Ok(())
    }
}

/// An error of writing the archive (the client went away, or the sink
/// failed).
pub fn sink_error(e: io::Error) -> Error {
    Error::io("writing the archive", e)
}

/// An error reading a source file, told apart from sink errors.
#[derive(Debug)]
struct SourceError {
    context: String,
}

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context)
    }
}

impl std::error::Error for SourceError {}

fn source_error(path: &Path, what: &str, e: &io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        SourceError {
            context: format!("{what} {}: {e}", path.display()),
        },
    )
}

/// Reads exactly `remaining` bytes, failing if the file is shorter (a file
/// changed under the export would otherwise corrupt the tar stream).
struct Exact<'p> {
    inner: File,
    remaining: u64,
    path: &'p Path,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self
            .inner
            .read(&mut buf[..max])
            .map_err(|e| source_error(self.path, "reading", &e))?;
        if n == 0 {
            let e = io::Error::from(io::ErrorKind::UnexpectedEof);
            return Err(source_error(self.path, "file shrank while reading", &e));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Reads the data regions of a sparse file one after the other.
struct Regions<'f> {
    file: &'f File,
    regions: Vec<(u64, u64)>,
    index: usize,
    done: u64,
    path: &'f Path,
}

impl Read for Regions<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(&(off, len)) = self.regions.get(self.index) else {
            return Ok(0);
        };
        let left = len - self.done;
        let max = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self
            .file
            .read_at(&mut buf[..max], off + self.done)
            .map_err(|e| source_error(self.path, "reading", &e))?;
        if n == 0 {
            let e = io::Error::from(io::ErrorKind::UnexpectedEof);
            return Err(source_error(self.path, "file shrank while reading", &e));
        }
        self.done += n as u64;
        if self.done == len {
            self.index += 1;
            self.done = 0;
        }
        Ok(n)
    }
}

/// The data regions (offset, length) of a file of `size` bytes, from
/// SEEK_DATA / SEEK_HOLE; the whole file where the filesystem cannot tell.
fn data_regions(file: &File, size: u64) -> std::result::Result<Vec<(u64, u64)>, Errno> {
    let whole = if size == 0 { vec![] } else { vec![(0, size)] };
    let fd = file.as_fd();
    let end = i64::try_from(size).map_err(|_| Errno::EFBIG)?;
    let mut regions = Vec::new();
    let mut off: i64 = 0;
    while off < end {
        let data = match lseek(fd, off, Whence::SeekData) {
            Ok(d) => d,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => return Ok(whole),
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = lseek(fd, data, Whence::SeekHole)?.min(end);
        regions.push((data as u64, (hole - data) as u64));
        off = hole;
    }
    Ok(regions)
}

/// Every extended attribute of `path` (not following a symlink), in name
/// order. A filesystem without extended attributes has none.
pub fn read_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listxattr {}", path.display()), e)),
    };
    let mut out = Vec::new();
    for name in names {
        let Some(text) = name.to_str() else {
            return Err(Error::FailedPrecondition(format!(
                "{} has an extended attribute whose name is not UTF-8: it cannot be exported",
                path.display()
            )));
        };
        // Removed between list and get: nothing to export.
        if let Some(value) =
            xattr::get(path, &name).context(|| format!("getxattr {} {text}", path.display()))?
        {
            out.push((text.to_owned(), value));
        }
    }
    out.sort();
    Ok(out)
}
