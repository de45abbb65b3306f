//! cowsnap: a copy-on-write snapshotter for containerd, on btrfs subvolumes.
//!
//! The library holds the core; the binary's daemon and tools are thin
//! adapters over it.
//!
//! - [`snapshotter::Snapshotter`] owns the snapshot lifecycle (the model is
//!   explained there), over
//! - [`meta::MetaStore`], the redb metadata, and
//! - a [`backend::Backend`] that knows only filesystem objects
//!   ([`backend::btrfs`]).
//! - [`grpc`] serves containerd's snapshots API; [`daemon`] runs it.
//!
//! docs/design.md describes the architecture, the metadata schema and the
//! crash protocol.

pub mod admin;
pub mod backend;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod destroy_queue;
pub mod embedded;
pub mod error;
pub mod failpoint;
pub mod filter;
pub mod grpc;
pub mod idmap;
pub mod inventory;
pub mod keylock;
pub mod meta;
pub mod metrics;
pub mod model;
pub mod rounds;
pub mod snapshotter;
pub mod transfer;

/// Code generated from proto/ (containerd's wire types and services).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// cowsnap's own packages.
    pub mod cowsnap {
        /// The administration API.
        pub mod admin {
            /// `cowsnap.admin.v1`.
            pub mod v1 {
                tonic::include_proto!("cowsnap.admin.v1");
            }
        }
    }
    /// containerd's packages.
    pub mod containerd {
        /// `containerd.types`.
        pub mod types {
            tonic::include_proto!("containerd.types");
        }
        /// containerd's services.
        pub mod services {
            /// The snapshots service.
            pub mod snapshots {
                /// `containerd.services.snapshots.v1`.
                pub mod v1 {
                    tonic::include_proto!("containerd.services.snapshots.v1");
                }
            }
        }
    }
}
