//! Mounting what a snapshotter's Prepare/View returns, the way containerd
//! would: bind mounts (cowsnap, and overlayfs for a single layer), btrfs
//! `subvolid=` mounts (containerd's btrfs snapshotter) and overlay mounts
//! (containerd's overlayfs snapshotter).
//!
//! Overlay mounts go through the new mount API (`fsopen`/`fsconfig`), one
//! `lowerdir+` per layer: a 128-layer `lowerdir=` string of absolute paths
//! does not fit in the one page `mount(2)` copies (containerd works around
//! that by changing directory and using relative paths, which a
//! multi-threaded process cannot do safely).

use std::ffi::{CString, c_char, c_int, c_uint};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::proto::containerd::types::Mount;

/// Largest option string `mount(2)` accepts (one page, with its NUL).
const MAX_MOUNT_DATA: usize = 4095;

// Kernel ABI of the new mount API (include/uapi/linux/mount.h); libc has the
// syscall numbers but not these constants.
const FSOPEN_CLOEXEC: c_uint = 0x1;
const FSCONFIG_SET_FLAG: c_uint = 0;
const FSCONFIG_SET_STRING: c_uint = 1;
const FSCONFIG_CMD_CREATE: c_uint = 6;
const FSMOUNT_CLOEXEC: c_uint = 0x1;
const MOUNT_ATTR_RDONLY: c_uint = 0x1;
const MOUNT_ATTR_NOSUID: c_uint = 0x2;
const MOUNT_ATTR_NODEV: c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: c_uint = 0x8;
const MOVE_MOUNT_F_EMPTY_PATH: c_uint = 0x4;

/// Mounts on one target, unmounted (lazily, `MNT_DETACH`) when dropped.
pub struct Mounted {
    target: PathBuf,
    layers: usize,
}

impl Mounted {
    /// Where the mounts are.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting an error (Drop only logs).
    pub fn unmount(mut self) -> Result<(), String> {
        let r = self.detach();
        self.layers = 0;
        r
    }

    fn detach(&mut self) -> Result<(), String> {
        while self.layers > 0 {
            umount2(&self.target, MntFlags::MNT_DETACH)
                .map_err(|e| format!("unmounting {}: {e}", self.target.display()))?;
            self.layers -= 1;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("bench: {e}");
        }
    }
}

/// Mounts every mount of `mounts` on `target` in order, as containerd's
/// `mount.All` does.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted, String> {
    if mounts.is_empty() {
        return Err("the snapshotter returned no mounts".into());
    }
    let mut done = Mounted {
        target: target.to_owned(),
        layers: 0,
    };
    for m in mounts {
        mount_one(m, target).map_err(|e| {
            format!(
                "mounting {{type: {}, source: {}, options: {:?}}} on {}: {e}",
                m.r#type,
                m.source,
                m.options,
                target.display()
            )
        })?;
        done.layers += 1;
    }
    Ok(done)
}

/// The `mount(2)` flags and the filesystem's own options of a containerd
/// option list.
struct Options {
    flags: MsFlags,
    data: Vec<String>,
}

fn parse_options(options: &[String]) -> Options {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            _ => {
                data.push(o.clone());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    Options { flags, data }
}

fn mount_one(m: &Mount, target: &Path) -> Result<(), String> {
    let opts = parse_options(&m.options);
    match m.r#type.as_str() {
        "bind" | "rbind" => {
            let mut flags = opts.flags | MsFlags::MS_BIND;
            if m.r#type == "rbind" {
                flags |= MsFlags::MS_REC;
            }
            mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                None::<&str>,
            )
            .map_err(|e| format!("bind mount: {e}"))?;
            // A bind mount ignores the other flags: read-only and friends
            // take a remount.
            let rest = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
            if !rest.is_empty() {
                mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
                    None::<&str>,
                )
                .map_err(|e| {
                    let _ = umount2(target, MntFlags::MNT_DETACH);
                    format!("remounting the bind mount with {rest:?}: {e}")
                })?;
            }
            Ok(())
        }
        // Options that fit in a page go through mount(2), as containerd
        // does (kernels before 6.8 have no `lowerdir+`); longer lists of
        // layers take the new mount API, one layer per call.
        "overlay" if opts.data.join(",").len() > MAX_MOUNT_DATA => {
            mount_overlay(&m.source, &opts, target)
        }
        fs_type => {
            let data = opts.data.join(",");
            if data.len() > MAX_MOUNT_DATA {
                return Err(format!(
                    "{} bytes of options do not fit in one page",
                    data.len()
                ));
            }
            mount(
                Some(m.source.as_str()),
                target,
                Some(fs_type),
                opts.flags,
                Some(data.as_str()),
            )
            .map_err(|e| format!("mount: {e}"))
        }
    }
}

fn cstring(s: &[u8]) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(s)))
}

/// Mounts an overlay with the new mount API, one `fsconfig` per option and
/// per lower layer.
fn mount_overlay(source: &str, opts: &Options, target: &Path) -> Result<(), String> {
    let fs = FsContext::open("overlay")?;
    let source = if source.is_empty() { "overlay" } else { source };
    fs.set_string("source", source)?;
    for o in &opts.data {
        match o.split_once('=') {
            Some(("lowerdir", dirs)) => {
                // `lowerdir+` appends below the layers given so far: the
                // list's order (topmost first) is kept. Paths with an
                // escaped ':' do not occur in containerd's mounts.
                for dir in dirs.split(':').filter(|d| !d.is_empty()) {
                    fs.set_string("lowerdir+", dir)?;
                }
            }
            Some((key, value)) => fs.set_string(key, value)?,
            None => fs.set_flag(o)?,
        }
    }
    if opts.flags.contains(MsFlags::MS_RDONLY) {
        fs.set_flag("ro")?;
    }
    fs.create()?;
    let mut attrs = 0;
    for (flag, attr) in [
        (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
    ] {
        if opts.flags.contains(flag) {
            attrs |= attr;
        }
    }
    let mnt = fs.mount(attrs)?;
    move_mount(&mnt, target)
}

/// A filesystem context of the new mount API (`fsopen`).
struct FsContext {
    fd: OwnedFd,
}

impl FsContext {
    fn open(fs_type: &str) -> Result<FsContext, String> {
        let name = cstring(fs_type.as_bytes())?;
        // SAFETY: fsopen reads the NUL-terminated name, which outlives the
        // call; the flags are a valid FSOPEN_* value.
        let fd = unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) };
        if fd < 0 {
            return Err(format!("fsopen({fs_type}): {}", Errno::last()));
        }
        // SAFETY: the kernel just returned this descriptor and nothing else
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as c_int) };
        Ok(FsContext { fd })
    }

    fn config(
        &self,
        cmd: c_uint,
        key: Option<&CString>,
        value: Option<&CString>,
        what: &str,
    ) -> Result<(), String> {
        let key_ptr = key.map_or(std::ptr::null(), |k| k.as_ptr());
        let value_ptr = value.map_or(std::ptr::null(), |v| v.as_ptr());
        // SAFETY: the descriptor is an fs context we own; key and value are
        // NUL-terminated strings (or null where the command takes none) that
        // outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                cmd,
                key_ptr,
                value_ptr as *const c_char,
                0 as c_int,
            )
        };
        if r < 0 {
            let errno = Errno::last();
            return Err(format!(
                "fsconfig {what}: {errno}{}",
                self.kernel_messages()
            ));
        }
        Ok(())
    }

    fn set_string(&self, key: &str, value: &str) -> Result<(), String> {
        let k = cstring(key.as_bytes())?;
        let v = cstring(value.as_bytes())?;
        self.config(
            FSCONFIG_SET_STRING,
            Some(&k),
            Some(&v),
            &format!("{key}={value}"),
        )
    }

    fn set_flag(&self, key: &str) -> Result<(), String> {
        let k = cstring(key.as_bytes())?;
        self.config(FSCONFIG_SET_FLAG, Some(&k), None, key)
    }

    fn create(&self) -> Result<(), String> {
        self.config(FSCONFIG_CMD_CREATE, None, None, "create")
    }

    fn mount(&self, attrs: c_uint) -> Result<OwnedFd, String> {
        // SAFETY: plain integer arguments on a descriptor we own.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                self.fd.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                attrs,
            )
        };
        if fd < 0 {
            return Err(format!(
                "fsmount: {}{}",
                Errno::last(),
                self.kernel_messages()
            ));
        }
        // SAFETY: the kernel just returned this descriptor and nothing else
        // owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as c_int) })
    }

    /// The messages the filesystem logged on the context (why it refused).
    fn kernel_messages(&self) -> String {
        let mut out = String::new();
        let mut buf = [0u8; 1024];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(n) if n > 0 => {
                    out.push_str(" [");
                    out.push_str(String::from_utf8_lossy(&buf[..n]).trim());
                    out.push(']');
                }
                _ => return out,
            }
        }
    }
}

fn move_mount(mnt: &OwnedFd, target: &Path) -> Result<(), String> {
    let empty = cstring(b"")?;
    let to = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: `mnt` is a detached mount we own; both paths are
    // NUL-terminated and outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(format!("move_mount: {}", Errno::last()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_filesystem_data() {
        let o = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "subvolid=257".into(),
            "nosuid".into(),
        ]);
        assert!(
            o.flags
                .contains(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY)
        );
        assert!(o.flags.contains(MsFlags::MS_NOSUID));
        assert_eq!(o.data, vec!["subvolid=257".to_string()]);
    }

    #[test]
    fn a_later_rw_clears_an_earlier_ro() {
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
    }
}
