//! Trees with every kind of file metadata an export must keep, and a
//! byte-for-byte comparison of two trees.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use nix::fcntl::AtFlags;
use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};

/// Size of the sparse file: 1 GiB and a few bytes, three small extents.
pub const SPARSE_SIZE: u64 = (1 << 30) + 7;

/// Which optional metadata the machine let the builder set.
#[derive(Debug, Default, Clone, Copy)]
pub struct Features {
    /// `security.capability` on bin/tool.
    pub capability: bool,
    /// `trusted.*` on a symlink.
    pub trusted_on_symlink: bool,
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn lchown(p: &Path, uid: u32, gid: u32) {
    fchownat(
        nix::fcntl::AT_FDCWD,
        p,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

/// Writes `len` bytes of a pattern seeded by `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A tree with regular, empty and sparse files, odd modes, owners,
/// symlinks (odd and long targets), hard links, xattrs, a fifo, device
/// nodes, long and non-UTF-8 names and set mtimes. With `whiteout_name`,
/// also a real file named like a whiteout (only a full-tree export can
/// carry it).
pub fn build(root: &Path, whiteout_name: bool) -> Features {
    let mut f = Features::default();
    fs::write(root.join("file.txt"), pattern(100_000, 1)).unwrap();
    File::create(root.join("empty")).unwrap();
    let sparse = File::create(root.join("sparse")).unwrap();
    sparse.set_len(SPARSE_SIZE).unwrap();
    sparse.write_all_at(b"head", 0).unwrap();
    sparse.write_all_at(&pattern(70_000, 2), 300 << 20).unwrap();
    sparse.write_all_at(b"tail", SPARSE_SIZE - 4).unwrap();
    drop(sparse);

    fs::create_dir(root.join("private")).unwrap();
    chmod(&root.join("private"), 0o700);
    fs::write(root.join("private/secret"), b"s3cret").unwrap();
    chmod(&root.join("private/secret"), 0o400);
    fs::create_dir(root.join("tmp")).unwrap();
    chmod(&root.join("tmp"), 0o1777);
    fs::create_dir(root.join("bin")).unwrap();
    fs::write(root.join("bin/tool"), pattern(5000, 3)).unwrap();
    chmod(&root.join("bin/tool"), 0o6755);

    fs::write(root.join("owned"), b"owned by 1234:5678").unwrap();
    lchown(&root.join("owned"), 1234, 5678);
    fs::create_dir(root.join("owned-dir")).unwrap();
    lchown(&root.join("owned-dir"), 1234, 5678);
    chmod(&root.join("owned-dir"), 0o2750);

    symlink("file.txt", root.join("link-rel")).unwrap();
    lchown(&root.join("link-rel"), 1234, 5678);
    symlink("../file.txt", root.join("bin/link-up")).unwrap();
    symlink("a//b/./c/", root.join("link-odd")).unwrap();
    symlink("/etc/passwd", root.join("link-abs")).unwrap();
    symlink(format!("{}/y", "x".repeat(150)), root.join("link-long")).unwrap();

    fs::write(root.join("hard-a"), b"one inode, three names").unwrap();
    fs::hard_link(root.join("hard-a"), root.join("owned-dir/hard-b")).unwrap();
    fs::hard_link(root.join("hard-a"), root.join("bin/hard-c")).unwrap();

    xattr::set(root.join("file.txt"), "user.comment", b"hello\0world\xff").unwrap();
    xattr::set(root.join("private"), "user.dir", b"d").unwrap();
    xattr::set(root.join("bin"), "user.empty", b"").unwrap();
    // vfs_cap_data revision 2, effective, CAP_NET_BIND_SERVICE permitted.
    let mut cap = vec![0u8; 20];
    cap[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    cap[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    f.capability = xattr::set(root.join("bin/tool"), "security.capability", &cap).is_ok();
    f.trusted_on_symlink = xattr::set(root.join("link-abs"), "trusted.note", b"t").is_ok();

    mknod(
        &root.join("fifo"),
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(0o640),
        0,
    )
    .unwrap();
    mknod(
        &root.join("dev-null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknod(
        &root.join("dev-loop"),
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o660),
        makedev(7, 200),
    )
    .unwrap();
    chmod(&root.join("dev-null"), 0o666);

    let deep = root
        .join("d".repeat(60))
        .join("e".repeat(60))
        .join("f".repeat(60));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("g".repeat(100)), b"long path").unwrap();
    fs::write(root.join(OsStr::from_bytes(b"caf\xe9")), b"latin-1 name").unwrap();
    if whiteout_name {
        fs::write(root.join(".wh.not-a-whiteout"), b"real").unwrap();
    }
    set_mtimes(root, 1_600_000_000);
    f
}

/// Gives every entry under `root` (and `root`) a distinct mtime with
/// nanoseconds, children before their directory so the directory's stays.
pub fn set_mtimes(root: &Path, base: i64) {
    let mut n = 0;
    set_mtimes_in(root, base, &mut n);
}

fn set_mtimes_in(path: &Path, base: i64, n: &mut i64) {
    let md = fs::symlink_metadata(path).unwrap();
    if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            set_mtimes_in(&path.join(name), base, n);
        }
    }
    *n += 1;
    let t = TimeSpec::new(base + *n, *n * 1000 + 7);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
}

/// What the comparison looks at for one path.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    target: Option<Vec<u8>>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// Every path under `root` (relative, raw bytes) with its metadata, and the
/// inode of each.
fn scan(root: &Path) -> (BTreeMap<Vec<u8>, Entry>, BTreeMap<Vec<u8>, u64>) {
    let mut entries = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    scan_in(root, Vec::new(), &mut entries, &mut inodes);
    (entries, inodes)
}

fn scan_in(
    root: &Path,
    rel: Vec<u8>,
    entries: &mut BTreeMap<Vec<u8>, Entry>,
    inodes: &mut BTreeMap<Vec<u8>, u64>,
) {
    let path = if rel.is_empty() {
        root.to_owned()
    } else {
        root.join(OsStr::from_bytes(&rel))
    };
    let md = fs::symlink_metadata(&path).unwrap();
    let ft = md.file_type();
    use std::os::unix::fs::FileTypeExt;
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "other"
    };
    let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&path)
        .map(|names| {
            names
                .map(|n| {
                    let v = xattr::get(&path, &n).unwrap().unwrap_or_default();
                    (n.to_string_lossy().into_owned(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    xattrs.sort();
    entries.insert(
        rel.clone(),
        Entry {
            kind,
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            // A directory's size is filesystem bookkeeping.
            size: if ft.is_dir() { 0 } else { md.size() },
            mtime: (md.mtime(), md.mtime_nsec()),
            nlink: if ft.is_dir() { 0 } else { md.nlink() },
            rdev: md.rdev(),
            target: ft.is_symlink().then(|| {
                fs::read_link(&path)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec()
            }),
            xattrs,
        },
    );
    inodes.insert(rel.clone(), md.ino());
    if ft.is_dir() {
        for e in fs::read_dir(&path).unwrap() {
            let mut child = rel.clone();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(e.unwrap().file_name().as_bytes());
            scan_in(root, child, entries, inodes);
        }
    }
}

fn same_contents(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Groups of paths that are one inode (hard links), as sets of paths.
fn link_groups(
    inodes: &BTreeMap<Vec<u8>, u64>,
    entries: &BTreeMap<Vec<u8>, Entry>,
) -> BTreeSet<BTreeSet<Vec<u8>>> {
    let mut by_ino: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (p, ino) in inodes {
        if entries[p].kind != "dir" {
            by_ino.entry(*ino).or_default().insert(p.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// Panics, listing every difference, unless the trees at `a` and `b` hold
/// the same paths with the same type, mode, owner, size, mtime, link
/// count, device, symlink target, extended attributes and bytes, and the
/// same hard-link groups.
pub fn assert_same(a: &Path, b: &Path) {
    let (ea, ia) = scan(a);
    let (eb, ib) = scan(b);
    let mut diffs = Vec::new();
    let pa: BTreeSet<_> = ea.keys().collect();
    let pb: BTreeSet<_> = eb.keys().collect();
    for p in pa.symmetric_difference(&pb) {
        diffs.push(format!("only in one tree: {}", String::from_utf8_lossy(p)));
    }
    for (p, x) in &ea {
        let Some(y) = eb.get(p) else { continue };
        let shown = String::from_utf8_lossy(p);
        if x != y {
            diffs.push(format!("{shown}: {x:?} != {y:?}"));
        } else if x.kind == "file"
            && !same_contents(&a.join(OsStr::from_bytes(p)), &b.join(OsStr::from_bytes(p)))
        {
            diffs.push(format!("{shown}: contents differ"));
        }
    }
    let (ga, gb) = (link_groups(&ia, &ea), link_groups(&ib, &eb));
    if ga != gb {
        diffs.push(format!("hard links differ: {ga:?} != {gb:?}"));
    }
    assert!(diffs.is_empty(), "trees differ:\n{}", diffs.join("\n"));
}

/// Bytes the file at `p` occupies on disk.
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}
