//! How the end-to-end test reads state: the image's facts, ctr's tables,
//! btrfs's listings and extended attributes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cowsnap::proto::containerd::services::snapshots::v1 as pb;
use serde_json::Value;

use crate::harness::Env;

/// The image's facts, written by build-image.py next to the tar.
pub struct Image {
    pub tar: PathBuf,
    pub name: String,
    pub chain_ids: Vec<String>,
    pub many_dirs_visible: u64,
    pub many_files_per_dir: u64,
    pub xattr: (String, String),
}

/// Builds (or reuses) the image and reads its facts.
pub fn build_image() -> Image {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/build-image.py");
    let cache =
        std::env::var("COWSNAP_E2E_CACHE").unwrap_or_else(|_| "/var/cache/cowsnap-test".into());
    let out = Command::new("python3")
        .arg(&script)
        .args(["--cache-dir", &cache])
        .output()
        .expect("running python3 tests/e2e/build-image.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build-image.py failed: {stderr}");
    eprint!("{stderr}");
    let tar = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let facts: Value = serde_json::from_str(
        &std::fs::read_to_string(tar.with_extension("json")).expect("image facts"),
    )
    .expect("image facts are JSON");
    let s = |v: &Value| v.as_str().expect("string").to_owned();
    Image {
        name: s(&facts["image"]),
        chain_ids: facts["chain_ids"]
            .as_array()
            .expect("chain_ids")
            .iter()
            .map(s)
            .collect(),
        many_dirs_visible: facts["many_dirs_visible"]
            .as_u64()
            .expect("many_dirs_visible"),
        many_files_per_dir: facts["many_files_per_dir"]
            .as_u64()
            .expect("many_files_per_dir"),
        xattr: (s(&facts["xattr"][0]), s(&facts["xattr"][1])),
        tar,
    }
}

/// containerd's key for a backend name: containerd names its snapshots in
/// a backend `<namespace>/<n>/<key>`.
pub fn ctr_key(backend_name: &str) -> String {
    let mut parts = backend_name.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(key)) => key.to_owned(),
        _ => backend_name.to_owned(),
    }
}

/// The one snapshot cowsnap holds for containerd's `key`.
pub fn by_ctr_key<'a>(list: &'a [pb::Info], key: &str) -> &'a pb::Info {
    let found: Vec<&pb::Info> = list.iter().filter(|i| ctr_key(&i.name) == key).collect();
    assert_eq!(
        found.len(),
        1,
        "snapshots of containerd key {key} in cowsnap: {list:#?}"
    );
    found[0]
}

/// `ctr snapshots ls` rows: key -> (parent, kind).
pub fn parse_ls(out: &str) -> BTreeMap<String, (String, String)> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [k, kind] => Some((k.to_string(), (String::new(), kind.to_string()))),
                [k, p, kind] => Some((k.to_string(), (p.to_string(), kind.to_string()))),
                _ => None,
            }
        })
        .collect()
}

/// `ctr snapshots usage -b` rows: key -> (bytes, inodes).
pub fn parse_usage(out: &str) -> BTreeMap<String, (u64, u64)> {
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.to_string(),
                (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?),
            ))
        })
        .collect()
}

/// cowsnap's committed subvolumes (paths relative to the mount) from the
/// base layer up, following btrfs's parent uuids: each layer was made as a
/// snapshot of the one below, and a container's as one of the top layer.
pub fn committed_chain(env: &Env) -> Vec<String> {
    let committed: Vec<(String, (String, String))> = subvolume_uuids(env)
        .into_iter()
        .filter(|(p, _)| p.starts_with("root/committed/"))
        .collect();
    let mut chain = Vec::new();
    let mut cur = committed
        .iter()
        .find(|(_, (pu, _))| !committed.iter().any(|(_, (_, u))| u == pu));
    while let Some((path, (_, uuid))) = cur {
        chain.push(path.clone());
        cur = committed.iter().find(|(_, (pu, _))| pu == uuid);
        if chain.len() > committed.len() {
            break;
        }
    }
    chain
}

/// `btrfs subvolume list -q -u`: path -> (parent uuid, uuid).
pub fn subvolume_uuids(env: &Env) -> BTreeMap<String, (String, String)> {
    let mnt = env.mnt.display().to_string();
    env.tool_ok("btrfs", &["subvolume", "list", "-q", "-u", &mnt])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let after = |k: &str| f.iter().position(|x| *x == k).and_then(|i| f.get(i + 1));
            Some((
                after("path")?.to_string(),
                (
                    after("parent_uuid")?.to_string(),
                    after("uuid")?.to_string(),
                ),
            ))
        })
        .collect()
}

/// Bytes of data used on the btrfs (`btrfs filesystem df -b`).
pub fn data_used(mnt: &Path) -> u64 {
    let out = Command::new("btrfs")
        .args(["filesystem", "df", "-b"])
        .arg(mnt)
        .output()
        .expect("btrfs filesystem df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("Data,"))
        .and_then(|l| l.split("used=").nth(1))
        .and_then(|v| v.trim().parse().ok())
        .expect("Data line in btrfs filesystem df")
}

/// An extended attribute's value, or None.
pub fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let p = CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the kernel writes at most buf.len() bytes into buf.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}
