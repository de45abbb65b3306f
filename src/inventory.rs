//! What operators ask of the snapshotter: details of snapshots with their
//! ids and live space figures, resolving a reference, the usage report,
//! consistency checks and size limits. The admin API (src/admin.rs) and the
//! command-line tools are adapters over these.

use std::collections::{HashMap, HashSet};

use tracing::{info, warn};

use crate::backend::{AccountingState, FilesystemSpace, FoundObject, ObjectSpace};
use crate::error::{Error, Result};
use crate::filter::{FilterSet, SnapshotFields};
use crate::meta::Record;
use crate::model::{Kind, SnapshotId, truncate_for_message};
use crate::snapshotter::Snapshotter;

/// Shortest id prefix accepted as a reference.
pub const MIN_ID_PREFIX: usize = 3;

/// One snapshot with cowsnap's details.
#[derive(Debug, Clone)]
pub struct Detail {
    /// Key or name.
    pub key: String,
    /// The record.
    pub record: Record,
    /// Live space figures, when asked for.
    pub space: Option<ObjectSpace>,
    /// Inodes created beyond the parent: measured live for an active
    /// snapshot or view by `inspect`, else the figure recorded at commit.
    pub inodes: Option<u64>,
    /// Number of children.
    pub children: u64,
    /// Where the object is.
    pub location: String,
}

/// Counts and state for `status`.
#[derive(Debug, Clone)]
pub struct Status {
    /// Snapshots by kind: active, view, committed.
    pub active: u64,
    /// Views.
    pub views: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// Accounting state.
    pub accounting: AccountingState,
}

/// The usage report: every snapshot and the filesystem.
#[derive(Debug, Clone)]
pub struct UsageReport {
    /// Every snapshot, with space figures.
    pub snapshots: Vec<Detail>,
    /// The filesystem's own figures.
    pub filesystem: FilesystemSpace,
    /// Sum of the snapshots' exclusive bytes.
    pub accounted: u64,
    /// Accounting state.
    pub accounting: AccountingState,
}

/// One inconsistency found by [`Snapshotter::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What kind of inconsistency (see the admin proto).
    pub kind: &'static str,
    /// The snapshot id concerned (0 if none).
    pub id: u64,
    /// The key concerned, if any.
    pub key: String,
    /// For people.
    pub detail: String,
    /// Whether it was repaired.
    pub repaired: bool,
}

impl Snapshotter {
    /// Snapshots matching `filters` with cowsnap's details; live space
    /// figures when `with_space`.
    pub fn details(&self, filters: &[String], with_space: bool) -> Result<Vec<Detail>> {
        let filter =
            FilterSet::parse(filters).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let children = self.meta.children_counts()?;
        let mut out = Vec::new();
        for (key, record) in self.meta.all()? {
            let fields = SnapshotFields {
                name: &key,
                parent: record.parent.as_deref().unwrap_or(""),
                kind: record.kind.as_str(),
                labels: &record.labels,
            };
            if !filter.is_always() && !filter.matches(&fields) {
                continue;
            }
            out.push(self.detail(key, record, &children, with_space)?);
        }
        Ok(out)
    }

    fn detail(
        &self,
        key: String,
        record: Record,
        children: &HashMap<SnapshotId, u64>,
        with_space: bool,
    ) -> Result<Detail> {
        let space = if with_space {
            Some(self.backend.space(&record.object)?)
        } else {
            None
        };
        Ok(Detail {
            inodes: record.usage.map(|u| u.inodes),
            location: self.backend.location(&record.object, record.kind),
            children: children.get(&record.id).copied().unwrap_or(0),
            key,
            record,
            space,
        })
    }

    /// Resolves a reference: an exact key or name first, then an exact
    /// numeric id, then a unique prefix (at least [`MIN_ID_PREFIX`] digits)
    /// of an id. Ambiguity is InvalidArgument listing the candidates.
    pub fn resolve(&self, reference: &str) -> Result<(String, Record)> {
        if reference.is_empty() {
            return Err(Error::InvalidArgument("empty reference".into()));
        }
        if let Some(r) = self.meta.get(reference)? {
            return Ok((reference.to_owned(), r));
        }
        if !reference.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::NotFound(format!(
                "snapshot {}",
                truncate_for_message(reference)
            )));
        }
        if let Ok(id) = reference.parse::<u64>()
            && let Some(key) = self.meta.key_of(SnapshotId(id))?
            && let Some(r) = self.meta.get(&key)?
        {
            return Ok((key, r));
        }
        if reference.len() < MIN_ID_PREFIX {
            return Err(Error::NotFound(format!(
                "snapshot {reference} (an id prefix needs at least {MIN_ID_PREFIX} digits)"
            )));
        }
        let matches: Vec<SnapshotId> = self
            .meta
            .all_ids()?
            .into_iter()
            .filter(|id| id.0.to_string().starts_with(reference))
            .collect();
        match matches.as_slice() {
            [] => Err(Error::NotFound(format!("snapshot {reference}"))),
            [id] => {
                let key = self
                    .meta
                    .key_of(*id)?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {reference}")))?;
                let r = self
                    .meta
                    .get(&key)?
                    .ok_or_else(|| Error::NotFound(format!("snapshot {reference}")))?;
                Ok((key, r))
            }
            many => {
                let mut names = Vec::new();
                for id in many.iter().take(20) {
                    let key = self.meta.key_of(*id)?.unwrap_or_default();
                    names.push(format!("{id} ({})", truncate_for_message(&key)));
                }
                let more = if many.len() > 20 {
                    format!(" and {} more", many.len() - 20)
                } else {
                    String::new()
                };
                Err(Error::InvalidArgument(format!(
                    "id prefix {reference} is ambiguous: {}{more}",
                    names.join(", ")
                )))
            }
        }
    }

    /// One snapshot's details with live space figures.
    pub fn inspect(&self, reference: &str) -> Result<Detail> {
        let (key, record) = self.resolve(reference)?;
        let children = self.meta.children_counts()?;
        let kind = record.kind;
        let mut d = self.detail(key, record, &children, true)?;
        if kind != Kind::Committed {
            d.inodes = Some(self.backend.usage(&d.record.object, kind)?.inodes);
        }
        Ok(d)
    }

    /// Counts and accounting state.
    pub fn status(&self) -> Result<Status> {
        let (mut active, mut views, mut committed) = (0, 0, 0);
        for (_, r) in self.meta.all()? {
            match r.kind {
                Kind::Active => active += 1,
                Kind::View => views += 1,
                Kind::Committed => committed += 1,
            }
        }
        Ok(Status {
            active,
            views,
            committed,
            accounting: self.backend.accounting()?,
        })
    }

    /// Every snapshot with live space figures, and the filesystem's.
    pub fn usage_report(&self) -> Result<UsageReport> {
        let snapshots = self.details(&[], true)?;
        let accounted = snapshots
            .iter()
            .map(|d| d.space.map(|s| s.exclusive).unwrap_or(0))
            .sum();
        Ok(UsageReport {
            snapshots,
            filesystem: self.backend.filesystem_space()?,
            accounted,
            accounting: self.backend.accounting()?,
        })
    }

    /// Sets (`Some`) or clears (`None`) the size limit of a snapshot.
    pub fn set_quota(&self, reference: &str, limit: Option<u64>) -> Result<Detail> {
        let (key, _) = self.resolve(reference)?;
        let _guard = self.locks.lock(&[&key]);
        let record = self
            .meta
            .get(&key)?
            .ok_or_else(|| Error::NotFound(format!("snapshot {}", truncate_for_message(&key))))?;
        self.backend.set_limit(&record.object, limit)?;
        let record = self.meta.update(&key, |r| {
            r.limit = limit;
            Ok(())
        })?;
        info!(key = %truncate_for_message(&key), id = %record.id, ?limit, "size limit set");
        let children = self.meta.children_counts()?;
        self.detail(key, record, &children, true)
    }

    /// Compares metadata, filesystem and accounting. With `repair`,
    /// destroys orphan objects, puts objects in the state their record says
    /// (for keys not in use), and starts an accounting repair. A record
    /// whose object is missing is reported, never dropped here.
    pub fn check(&self, repair: bool) -> Result<Vec<Finding>> {
        let mut findings = Vec::new();
        // Same ordering argument as Cleanup: filesystem, then the set of
        // objects being created or destroyed, then the records.
        let found = self.backend.scan()?;
        let mut busy = self.busy_ids();
        let records = self.meta.all()?;
        // A Remove marks its id busy before it drops the record: an id whose
        // record was gone when the records were read is busy now, or its
        // object is destroyed (the rescan below).
        busy.extend(self.busy_ids());
        let recorded: HashSet<SnapshotId> = records.iter().map(|(_, r)| r.id).collect();
        let by_id: HashMap<SnapshotId, FoundObject> = found.iter().map(|f| (f.id, *f)).collect();
        let mut orphans: Vec<&FoundObject> = found
            .iter()
            .filter(|f| !recorded.contains(&f.id) && !busy.contains(&f.id))
            .collect();
        if !orphans.is_empty() {
            let still: HashSet<SnapshotId> = self.backend.scan()?.iter().map(|f| f.id).collect();
            orphans.retain(|f| still.contains(&f.id));
        }

        for f in orphans {
            let mut finding = Finding {
                kind: "orphan_object",
                id: f.id.0,
                key: String::new(),
                detail: format!("object {} in the {} area has no record", f.id, f.area),
                repaired: false,
            };
            if repair {
                match self.backend.destroy(f.id, f.native) {
                    Ok(()) => finding.repaired = true,
                    Err(e) => finding
                        .detail
                        .push_str(&format!("; destroying it failed: {e}")),
                }
            }
            findings.push(finding);
        }
        for (key, record) in &records {
            match by_id.get(&record.id) {
                None => findings.push(Finding {
                    kind: "missing_object",
                    id: record.id.0,
                    key: key.clone(),
                    detail: format!(
                        "{} snapshot has no filesystem object (deleted outside cowsnap?); remove the snapshot to drop it",
                        record.kind
                    ),
                    repaired: false,
                }),
                // A key in the middle of an operation (a Commit between its
                // rename and its metadata step) is not an inconsistency.
                Some(f)
                    if (f.area != record.kind || f.readonly != (record.kind != Kind::Active))
                        && !self.locks.is_held(key) =>
                {
                    let mut finding = Finding {
                        kind: "wrong_state",
                        id: record.id.0,
                        key: key.clone(),
                        detail: format!(
                            "{} snapshot's object is in the {} area, read-only={}",
                            record.kind, f.area, f.readonly
                        ),
                        repaired: false,
                    };
                    if repair {
                        finding.repaired = self.reconcile_one(key, record.id)?;
                    }
                    findings.push(finding);
                }
                Some(_) => {}
            }
        }
        let accounting = self.backend.accounting()?;
        if !accounting.consistent {
            let mut finding = Finding {
                kind: "quota_inconsistent",
                id: 0,
                key: String::new(),
                detail: format!(
                    "the filesystem reports its {} quota accounting inconsistent",
                    accounting.mode
                ),
                repaired: false,
            };
            if repair {
                self.backend.repair_accounting()?;
                finding.repaired = true;
                finding.detail.push_str("; rescan started");
            }
            findings.push(finding);
        }
        if repair {
            let live: Vec<FoundObject> = self.backend.scan()?;
            let removed = self.backend.cleanup(&live)?.stale_accounting_removed;
            if removed > 0 {
                findings.push(Finding {
                    kind: "stale_accounting",
                    id: 0,
                    key: String::new(),
                    detail: format!("{removed} quota groups of deleted objects"),
                    repaired: true,
                });
            }
        }
        for f in &findings {
            if f.repaired {
                info!(kind = f.kind, id = f.id, detail = %f.detail, "check: repaired");
            } else {
                warn!(kind = f.kind, id = f.id, detail = %f.detail, "check: inconsistency");
            }
        }
        Ok(findings)
    }

    /// Under the key's lock, re-reads the record and the object and moves
    /// the object to the state the record says. Returns whether it did.
    fn reconcile_one(&self, key: &str, id: SnapshotId) -> Result<bool> {
        let _guard = self.locks.lock(&[key]);
        let Some(record) = self.meta.get(key)? else {
            return Ok(false);
        };
        if record.id != id {
            return Ok(false);
        }
        let Some(f) = self.backend.scan()?.into_iter().find(|f| f.id == id) else {
            return Ok(false);
        };
        if f.area == record.kind && f.readonly == (record.kind != Kind::Active) {
            return Ok(true);
        }
        self.backend.reconcile(&f, record.kind)?;
        Ok(true)
    }
}
