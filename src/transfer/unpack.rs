//! Applying a layer: tar entries written by [`super::pack`] into the tree
//! of an active snapshot.
//!
//! The archive comes from a client, so nothing in it is trusted: every path
//! is checked to be plain and relative, and resolved one component at a
//! time with `openat(O_NOFOLLOW)` from the tree's root, so no entry can
//! reach outside the tree through `..` or a symlink it created earlier.
//! Everything is then done with `*at` calls relative to the parent
//! directory's descriptor.
//!
//! Order of operations per entry: create, write the data, change the owner
//! (which clears set-id bits and `security.capability`), set the mode, the
//! extended attributes, then the mtime. Directory mtimes are set last, in
//! [`Unpacker::finish`], because creating entries inside moves them.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, UtimensatFlags, fstatat, makedev, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};
use tar::EntryType;

use super::archive::{components, split_layer_path};
use super::entry::{bad, copy_data, entry_meta, read_error, read_pax, write_sparse};
use super::pack::WHITEOUT_PREFIX;
use crate::error::{Error, IoContext, Result};

/// Applies the entries of one layer to the tree at a root directory.
pub struct Unpacker {
    root: OwnedFd,
    root_path: PathBuf,
    layer: usize,
    diff: bool,
    /// Directories to give an mtime at the end: those the layer has an
    /// entry for, and those it changed without one (they keep the mtime
    /// they had before the layer).
    dir_times: HashMap<Vec<Vec<u8>>, TimeSpec>,
    /// The directory of the previous entry, reused for its siblings.
    cache: Option<(Vec<Vec<u8>>, OwnedFd)>,
    entries: u64,
}

impl Unpacker {
    /// Applies layer `layer` to the tree at `root`; `diff` says whether the
    /// layer holds differences (whiteouts are honoured) or a full tree.
    pub fn new(root: &Path, layer: usize, diff: bool) -> Result<Self> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .context(|| format!("open {}", root.display()))?;
        Ok(Unpacker {
            root: fd,
            root_path: root.to_owned(),
            layer,
            diff,
            dir_times: HashMap::new(),
            cache: None,
            entries: 0,
        })
    }

    /// Applies one entry whose path inside the layer is `inner`.
    pub fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, inner: &[u8]) -> Result<()> {
        let comps: Vec<Vec<u8>> = components(inner)?.into_iter().map(<[u8]>::to_vec).collect();
        let pax = read_pax(entry)?;
        let header = entry.header();
        let kind = header.entry_type();
        let whiteout = self.diff && comps.last().is_some_and(|n| n.starts_with(WHITEOUT_PREFIX));
        // Hard links and whiteouts have no metadata of their own.
        let (mode, owner, mtime) = if kind == EntryType::Link || whiteout {
            (0, (Uid::from_raw(0), Gid::from_raw(0)), TimeSpec::new(0, 0))
        } else {
            entry_meta(header, &pax)?
        };
        self.entries += 1;

        let Some((name, dir_comps)) = comps.split_last() else {
            // The layer's root: the tree's own directory.
            if !kind.is_dir() {
                return Err(bad("archive layer root is not a directory".into()));
            }
            let root = self.root.try_clone().context(|| "dup".to_owned())?;
            let shown = || self.root_path.display().to_string();
            self.set_meta(root.as_fd(), owner, mode, &pax.xattrs, true, &shown)?;
            self.dir_times.insert(Vec::new(), mtime);
            return Ok(());
        };
        let dir_fd = self.open_dir(dir_comps)?;
        let dir = dir_fd.as_fd();
        self.touch(dir_comps, dir)?;
        let root_path = self.root_path.clone();
        let shown = move || format!("{}/{}", root_path.display(), String::from_utf8_lossy(inner));

        if whiteout && let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if target.starts_with(WHITEOUT_PREFIX) || target.is_empty() {
                return Err(bad(format!(
                    "unsupported whiteout {:?} in the archive",
                    String::from_utf8_lossy(inner)
                )));
            }
            self.cache = None;
            return remove_any(dir, target).context(|| format!("removing {}", shown()));
        }
        let name = OsStr::from_bytes(name);

        match kind {
            EntryType::Directory => {
                let existing = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW);
                let is_dir = matches!(&existing, Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR);
                if !is_dir {
                    if existing.is_ok() {
                        self.cache = None;
                        remove_any(dir, name.as_bytes())
                            .context(|| format!("replacing {}", shown()))?;
                    }
                    created(
                        nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(0o700)),
                        "mkdir",
                        &shown,
                    )?;
                }
                let fd = open_at(dir, name, OFlag::O_DIRECTORY)
                    .context(|| format!("open {}", shown()))?;
                self.set_meta(fd.as_fd(), owner, mode, &pax.xattrs, is_dir, &shown)?;
                self.dir_times.insert(comps.clone(), mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.replace(dir, name, &shown)?;
                let fd = created(
                    openat(
                        dir,
                        name,
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o600),
                    ),
                    "create",
                    &shown,
                )?;
                let mut file = File::from(fd);
                match pax.sparse_realsize {
                    Some(real) => write_sparse(entry, &file, real, &shown)?,
                    None => copy_data(entry, &mut file, &shown)?,
                }
                self.set_meta(file.as_fd(), owner, mode, &pax.xattrs, false, &shown)?;
                nix::sys::stat::futimens(file.as_fd(), &TimeSpec::UTIME_OMIT, &mtime)
                    .context(|| format!("set mtime of {}", shown()))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("hard link {} has no target", shown())))?
                    .into_owned();
                let (tl, tinner) = split_layer_path(&target)
                    .filter(|(n, _)| *n == self.layer)
                    .ok_or_else(|| {
                        bad(format!(
                            "hard link {} points outside its layer: {:?}",
                            shown(),
                            String::from_utf8_lossy(&target)
                        ))
                    })?;
                debug_assert_eq!(tl, self.layer);
                let tcomps: Vec<Vec<u8>> = components(tinner)?
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect();
                let Some((tname, tdir)) = tcomps.split_last() else {
                    return Err(bad(format!(
                        "hard link {} points to the layer root",
                        shown()
                    )));
                };
                let tdir_fd = self.open_dir(tdir)?;
                self.replace(dir, name, &shown)?;
                let linked = nix::unistd::linkat(
                    tdir_fd.as_fd(),
                    OsStr::from_bytes(tname),
                    dir,
                    name,
                    AtFlags::empty(),
                );
                if let Err(Errno::ENOENT | Errno::EPERM) = linked {
                    return Err(bad(format!(
                        "hard link {} to {:?}, which is no file of this layer",
                        shown(),
                        String::from_utf8_lossy(tinner)
                    )));
                }
                created(linked, "link", &shown)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(format!("symlink {} has no target", shown())))?
                    .into_owned();
                self.replace(dir, name, &shown)?;
                created(
                    nix::unistd::symlinkat(OsStr::from_bytes(&target), dir, name),
                    "symlink",
                    &shown,
                )?;
                self.set_node_meta(dir, name, owner, None, &pax.xattrs, mtime, &shown)?;
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    EntryType::Char | EntryType::Block => {
                        let major = header.device_major().map_err(read_error)?.unwrap_or(0);
                        let minor = header.device_minor().map_err(read_error)?.unwrap_or(0);
                        let f = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (f, makedev(u64::from(major), u64::from(minor)))
                    }
                    _ => unreachable!("matched above"),
                };
                self.replace(dir, name, &shown)?;
                created(
                    mknodat(dir, name, sflag, Mode::from_bits_truncate(0o600), dev),
                    "mknod",
                    &shown,
                )?;
                self.set_node_meta(dir, name, owner, Some(mode), &pax.xattrs, mtime, &shown)?;
            }
            EntryType::XGlobalHeader => {}
            other => {
                return Err(bad(format!(
                    "unsupported entry type {other:?} for {}",
                    shown()
                )));
            }
        }
        Ok(())
    }

    /// Sets the directory mtimes and returns the number of entries applied.
    pub fn finish(mut self) -> Result<u64> {
        // Setting a directory's times does not touch its parent's, so the
        // order does not matter.
        let dirs = std::mem::take(&mut self.dir_times);
        for (comps, mtime) in dirs {
            let fd = self.open_dir(&comps)?;
            nix::sys::stat::futimens(fd.as_fd(), &TimeSpec::UTIME_OMIT, &mtime).context(|| {
                format!(
                    "set mtime of {}/{}",
                    self.root_path.display(),
                    String::from_utf8_lossy(&comps.join(&b'/'))
                )
            })?;
        }
        Ok(self.entries)
    }

    /// Notes the mtime directory `comps` has before this layer changes it,
    /// unless the layer gives it one.
    fn touch(&mut self, comps: &[Vec<u8>], dir: BorrowedFd<'_>) -> Result<()> {
        if self.dir_times.contains_key(comps) {
            return Ok(());
        }
        let st = nix::sys::stat::fstat(dir).context(|| {
            format!(
                "stat {}/{}",
                self.root_path.display(),
                String::from_utf8_lossy(&comps.join(&b'/'))
            )
        })?;
        self.dir_times
            .insert(comps.to_vec(), TimeSpec::new(st.st_mtime, st.st_mtime_nsec));
        Ok(())
    }

    /// Removes whatever is at `name` so a new entry can take its place.
    fn replace(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        shown: &dyn Fn() -> String,
    ) -> Result<()> {
        if self.diff {
            self.cache = None;
            remove_any(dir, name.as_bytes()).context(|| format!("replacing {}", shown()))?;
        }
        Ok(())
    }

    /// Opens the directory at `comps` below the root without following any
    /// symlink.
    fn open_dir(&mut self, comps: &[Vec<u8>]) -> Result<OwnedFd> {
        if let Some((cached, fd)) = &self.cache
            && cached.as_slice() == comps
        {
            return fd.try_clone().context(|| "dup".to_owned());
        }
        let mut fd = self.root.try_clone().context(|| "dup".to_owned())?;
        for (i, c) in comps.iter().enumerate() {
            fd = open_at(fd.as_fd(), OsStr::from_bytes(c), OFlag::O_DIRECTORY).map_err(|e| {
                let at = String::from_utf8_lossy(&comps[..=i].join(&b'/')).into_owned();
                match e {
                    Errno::ENOENT => {
                        bad(format!("archive entry under {at:?}, which does not exist"))
                    }
                    Errno::ELOOP | Errno::ENOTDIR => bad(format!(
                        "archive entry under {at:?}, which is not a directory"
                    )),
                    e => Error::io(format!("open {}/{at}", self.root_path.display()), e),
                }
            })?;
        }
        self.cache = Some((comps.to_vec(), fd.try_clone().context(|| "dup".to_owned())?));
        Ok(fd)
    }

    /// Owner, mode and extended attributes of an open file or directory.
    /// `existing`: the object was there before, so stale attributes go.
    fn set_meta(
        &self,
        fd: BorrowedFd<'_>,
        owner: (Uid, Gid),
        mode: u32,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        existing: bool,
        shown: &dyn Fn() -> String,
    ) -> Result<()> {
        nix::unistd::fchown(fd, Some(owner.0), Some(owner.1))
            .context(|| format!("chown {}", shown()))?;
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode))
            .context(|| format!("chmod {}", shown()))?;
        // The /proc link is followed to the object we hold open, which is
        // no symlink (opened with O_NOFOLLOW).
        set_xattrs(&proc_path(fd, None), true, xattrs, existing)
            .context(|| format!("setting xattrs of {}", shown()))
    }

    /// Owner, mode (not for symlinks), extended attributes and mtime of a
    /// node that cannot be opened (symlink, fifo, device).
    #[allow(clippy::too_many_arguments)]
    fn set_node_meta(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        owner: (Uid, Gid),
        mode: Option<u32>,
        xattrs: &[(Vec<u8>, Vec<u8>)],
        mtime: TimeSpec,
        shown: &dyn Fn() -> String,
    ) -> Result<()> {
        nix::unistd::fchownat(
            dir,
            name,
            Some(owner.0),
            Some(owner.1),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .context(|| format!("chown {}", shown()))?;
        if let Some(mode) = mode {
            // Not a symlink (we just made it), so following is harmless.
            nix::sys::stat::fchmodat(
                dir,
                name,
                Mode::from_bits_truncate(mode),
                FchmodatFlags::FollowSymlink,
            )
            .context(|| format!("chmod {}", shown()))?;
        }
        set_xattrs(&proc_path(dir, Some(name)), false, xattrs, false)
            .context(|| format!("setting xattrs of {}", shown()))?;
        nix::sys::stat::utimensat(
            dir,
            name,
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .context(|| format!("set mtime of {}", shown()))
    }
}

/// A path naming `name` in the directory open as `fd` (or the object open
/// as `fd` itself) through /proc, for the path-only xattr calls.
fn proc_path(fd: BorrowedFd<'_>, name: Option<&OsStr>) -> PathBuf {
    let p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    match name {
        Some(n) => p.join(n),
        None => p,
    }
}

/// Sets `xattrs` on `path` (following its last component if `deref`, else
/// not), first removing the others if the object `existing` had some.
fn set_xattrs(
    path: &Path,
    deref: bool,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    existing: bool,
) -> io::Result<()> {
    if existing {
        let keep: Vec<&[u8]> = xattrs.iter().map(|(k, _)| k.as_slice()).collect();
        let listed = if deref {
            xattr::list_deref(path)
        } else {
            xattr::list(path)
        };
        let names = match listed {
            Ok(n) => n.collect::<Vec<_>>(),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
            Err(e) => return Err(e),
        };
        for n in names {
            if !keep.contains(&n.as_bytes()) {
                if deref {
                    xattr::remove_deref(path, &n)?;
                } else {
                    xattr::remove(path, &n)?;
                }
            }
        }
    }
    for (k, v) in xattrs {
        let k = OsStr::from_bytes(k);
        if deref {
            xattr::set_deref(path, k, v)?;
        } else {
            xattr::set(path, k, v)?;
        }
    }
    Ok(())
}

/// The result of creating an entry: a name that exists already means the
/// archive names it twice (a full tree starts empty; a diff replaced it).
fn created<T>(res: nix::Result<T>, what: &str, shown: &dyn Fn() -> String) -> Result<T> {
    match res {
        Err(Errno::EEXIST) => Err(bad(format!("the archive has two entries for {}", shown()))),
        other => other.context(|| format!("{what} {}", shown())),
    }
}

fn open_at(dir: BorrowedFd<'_>, name: &OsStr, extra: OFlag) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | extra,
        Mode::empty(),
    )
}

/// Removes `name` from `dir` whatever it is (a directory with everything in
/// it); a missing name is not an error.
fn remove_any(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let name = OsStr::from_bytes(name);
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        // std's remove_dir_all never follows symlinks inside the tree; the
        // /proc link only names the parent directory we hold open.
        std::fs::remove_dir_all(proc_path(dir, Some(name)))
    } else {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar entry with a raw (unchecked) path and link name.
    fn raw(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, path: &[u8], link: &[u8], data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_link_name_literal(link).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn apply_all(root: &Path, archive: Vec<u8>) -> Vec<Result<()>> {
        let mut u = Unpacker::new(root, 0, false).unwrap();
        let mut ar = tar::Archive::new(&archive[..]);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path_bytes().into_owned();
            let (_, inner) = split_layer_path(&path).unwrap();
            out.push(u.apply(&mut e, inner));
        }
        out
    }

    #[test]
    fn entries_cannot_reach_outside_the_tree() {
        let base = std::env::temp_dir().join(format!("cowsnap-unpack-{}", std::process::id()));
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let target = outside.as_os_str().as_bytes();
        raw(&mut b, EntryType::Symlink, b"layers/0/evil", target, b"");
        raw(
            &mut b,
            EntryType::Regular,
            b"layers/0/evil/pwned",
            b"",
            b"x",
        );
        raw(&mut b, EntryType::Regular, b"layers/0/../pwned", b"", b"x");
        raw(
            &mut b,
            EntryType::Link,
            b"layers/0/link",
            b"layers/0/../../etc/passwd",
            b"",
        );
        raw(
            &mut b,
            EntryType::Link,
            b"layers/0/link2",
            b"layers/1/x",
            b"",
        );
        raw(&mut b, EntryType::Regular, b"layers/0/ok", b"", b"fine");
        let results = apply_all(&root, b.into_inner().unwrap());
        let codes: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().err().map(Error::code))
            .collect();
        use crate::error::Code::InvalidArgument as Bad;
        assert_eq!(
            codes,
            vec![None, Some(Bad), Some(Bad), Some(Bad), Some(Bad), None]
        );
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert!(!base.join("pwned").exists());
        assert_eq!(std::fs::read(root.join("ok")).unwrap(), b"fine");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
