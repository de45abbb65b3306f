//! User-namespace id mappings for containers that run with a mapping
//! (containerd 2.x `remap-ids` capability).
//!
//! containerd passes the mapping as the Prepare/View labels
//! `containerd.io/snapshot/uidmapping` and `.../gidmapping`, each
//! `ctrID:hostID:size[,ctrID:hostID:size...]`. cowsnap does not chown or
//! copy anything: it returns the mounts with `uidmap=`/`gidmap=` options,
//! which containerd's mount code turns into an idmapped mount of the
//! snapshot. Files keep their owners on disk, so containers with different
//! mappings share the same committed layers.

use crate::error::{Error, Result};
use crate::model::{Labels, Mount, truncate_for_message};

/// Label carrying the uid mapping.
pub const UID_MAPPING_LABEL: &str = "containerd.io/snapshot/uidmapping";
/// Label carrying the gid mapping.
pub const GID_MAPPING_LABEL: &str = "containerd.io/snapshot/gidmapping";

/// Most ranges one mapping may have (the kernel's limit for an id map).
const MAX_RANGES: usize = 340;

/// A validated pair of id mappings, kept in containerd's text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMapping {
    uid: String,
    gid: String,
}

impl IdMapping {
    /// Reads the mapping labels: none → `None`; both, well formed → the
    /// mapping; one without the other or a malformed value →
    /// InvalidArgument.
    pub fn from_labels(labels: &Labels) -> Result<Option<IdMapping>> {
        match (labels.get(UID_MAPPING_LABEL), labels.get(GID_MAPPING_LABEL)) {
            (None, None) => Ok(None),
            (Some(uid), Some(gid)) => {
                validate(UID_MAPPING_LABEL, uid)?;
                validate(GID_MAPPING_LABEL, gid)?;
                Ok(Some(IdMapping {
                    uid: uid.clone(),
                    gid: gid.clone(),
                }))
            }
            (Some(_), None) => Err(Error::InvalidArgument(format!(
                "label {UID_MAPPING_LABEL} needs {GID_MAPPING_LABEL} too"
            ))),
            (None, Some(_)) => Err(Error::InvalidArgument(format!(
                "label {GID_MAPPING_LABEL} needs {UID_MAPPING_LABEL} too"
            ))),
        }
    }

    /// Adds the mapping to mounts of an object that is itself read-only
    /// when `object_readonly` (a view): containerd does not idmap a
    /// read-only bind mount, so the `ro` option is dropped there and the
    /// object's own read-only flag keeps it read-only.
    pub fn apply(&self, mounts: &mut [Mount], object_readonly: bool) {
        for m in mounts {
            if object_readonly {
                m.options.retain(|o| o != "ro");
            }
            m.options.push(format!("uidmap={}", self.uid));
            m.options.push(format!("gidmap={}", self.gid));
        }
    }
}

fn validate(label: &str, value: &str) -> Result<()> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "label {label}={}: {why}; expected ctrID:hostID:size[,ctrID:hostID:size...]",
            truncate_for_message(value)
        ))
    };
    let ranges: Vec<&str> = value.split(',').collect();
    if ranges.len() > MAX_RANGES {
        return Err(bad("too many ranges"));
    }
    let mut seen: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for range in ranges {
        let parts: Vec<&str> = range.split(':').collect();
        let [ctr, host, size] = parts.as_slice() else {
            return Err(bad("each range has three numbers"));
        };
        let num = |s: &str| -> Result<u64> {
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("not a number"));
            }
            s.parse::<u32>()
                .map(u64::from)
                .map_err(|_| bad("number out of range"))
        };
        let (ctr, host, size) = (num(ctr)?, num(host)?, num(size)?);
        if size == 0 {
            return Err(bad("a range of size 0"));
        }
        if ctr + size > 1 << 32 || host + size > 1 << 32 {
            return Err(bad("a range past the last id"));
        }
        if seen.iter().any(|&(c, s)| ctr < c + s && c < ctr + size) {
            return Err(bad("overlapping container ranges"));
        }
        seen.push((ctr, size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(uid: Option<&str>, gid: Option<&str>) -> Labels {
        let mut l = Labels::new();
        if let Some(u) = uid {
            l.insert(UID_MAPPING_LABEL.into(), u.into());
        }
        if let Some(g) = gid {
            l.insert(GID_MAPPING_LABEL.into(), g.into());
        }
        l
    }

    #[test]
    fn well_formed_mappings_become_mount_options() {
        let m = IdMapping::from_labels(&labels(
            Some("0:100000:65536"),
            Some("0:100000:65536,65536:300000:10"),
        ))
        .unwrap()
        .unwrap();
        let mut mounts = vec![Mount {
            fs_type: "bind".into(),
            source: "/x".into(),
            options: vec!["rbind".into(), "ro".into()],
        }];
        m.apply(&mut mounts, true);
        assert_eq!(
            mounts[0].options,
            [
                "rbind",
                "uidmap=0:100000:65536",
                "gidmap=0:100000:65536,65536:300000:10"
            ]
        );
    }

    #[test]
    fn no_labels_no_mapping() {
        assert_eq!(IdMapping::from_labels(&Labels::new()).unwrap(), None);
    }

    #[test]
    fn malformed_mappings_are_invalid_argument() {
        for (uid, gid) in [
            (Some("0:100000:65536"), None),
            (None, Some("0:100000:65536")),
            (Some("0:100000"), Some("0:1:1")),
            (Some("a:b:c"), Some("0:1:1")),
            (Some("0:100000:0"), Some("0:1:1")),
            (Some("-1:100000:10"), Some("0:1:1")),
            (Some("0:4294967295:2"), Some("0:1:1")),
            (Some("0:1:10,5:100:10"), Some("0:1:1")),
            (Some(""), Some("0:1:1")),
            (Some("0:1:1,"), Some("0:1:1")),
            (Some("0:99999999999:1"), Some("0:1:1")),
        ] {
            let e = IdMapping::from_labels(&labels(uid, gid)).unwrap_err();
            assert_eq!(
                e.code(),
                crate::error::Code::InvalidArgument,
                "{uid:?} {gid:?}"
            );
        }
    }
}
