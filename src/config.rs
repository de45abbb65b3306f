//! The daemon's configuration: defaults, the TOML file and command-line
//! overrides.
//!
//! `cowsnap serve [--root DIR] [--address SOCKET] [--config FILE]` builds its
//! [`Config`] in three layers, each overriding the one before:
//!
//! 1. the built-in defaults ([`Config::default`]);
//! 2. the TOML file: the one given with `--config` (it must exist), otherwise
//!    [`DEFAULT_CONFIG_PATH`] if it exists ([`Config::load_default_or_given`]);
//! 3. the `--root` and `--address` flags ([`Config::apply_overrides`]).
//!
//! [`Config::validate`] then checks the result once, so the rest of the daemon
//! can rely on absolute paths and a usable image size. Every option is
//! documented, with its default, in [`Config::example_toml`].

use std::fmt;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where the snapshots and the metadata live unless configured otherwise.
pub const DEFAULT_ROOT: &str = "/var/lib/cowsnap";

/// The gRPC socket containerd connects to unless configured otherwise.
pub const DEFAULT_ADDRESS: &str = "/run/cowsnap/cowsnap.sock";

/// The configuration file read when `--config` is not given; it is optional.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/cowsnap/config.toml";

/// Default size of the embedded loop image. The image is sparse, so this is
/// an upper bound on disk use, not an allocation.
pub const DEFAULT_EMBEDDED_SIZE: ByteSize = ByteSize(20 * GIB);

/// The smallest embedded image accepted. `mkfs.btrfs` refuses devices much
/// smaller than this (the minimum depends on the profiles and the btrfs-progs
/// version), and anything smaller would hold very few image layers anyway.
pub const MIN_EMBEDDED_SIZE: ByteSize = ByteSize(256 * MIB);

/// Longest socket path a Unix socket address can hold: `sun_path` is 108
/// bytes on Linux and needs a terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// Present on kernels that can enable btrfs simple quotas (Linux 6.7+).
const SIMPLE_QUOTA_FEATURE: &str = "/sys/fs/btrfs/features/simple_quota";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// An error while reading or checking the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read (missing, unreadable, ...).
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The configuration file is not valid TOML or does not match the schema
    /// (unknown key, wrong type, bad size). The message carries the line and
    /// column and quotes the offending line.
    #[error("invalid config file {}: {source}", path.display())]
    Parse {
        /// The file that was being parsed.
        path: PathBuf,
        /// The TOML error, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The configuration parsed but one option has an unusable value.
    #[error("invalid configuration: {option}: {reason}")]
    Invalid {
        /// The option at fault, spelled as in the TOML file (`embedded.size`).
        option: &'static str,
        /// Why the value cannot be used.
        reason: String,
    },
}

/// The daemon's configuration. See the module documentation for how it is
/// assembled and [`Config::example_toml`] for every option with its default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the metadata database and, with the btrfs backend,
    /// the snapshots. For btrfs it must be on btrfs, or the embedded image is
    /// mounted on it (see [`EmbeddedConfig`]); for ZFS it holds only the
    /// metadata. Default [`DEFAULT_ROOT`].
    pub root: PathBuf,
    /// Path of the Unix socket serving containerd's snapshots API. Default
    /// [`DEFAULT_ADDRESS`].
    pub address: PathBuf,
    /// A `tracing` EnvFilter directive such as `"info"` or
    /// `"cowsnap=debug,info"`. The `RUST_LOG` environment variable, when set
    /// and not empty, wins over this so that one run can be debugged without
    /// editing the file; see [`Config::log_directive`]. Default: none, which
    /// means `"info"`.
    pub log_level: Option<String>,
    /// Address (`host:port`) of the Prometheus metrics endpoint
    /// (`GET /metrics`). Default: none, the endpoint is off.
    pub metrics_address: Option<String>,
    /// Which filesystem backend stores the snapshots. Default btrfs.
    pub backend: BackendKind,
    /// Options of the btrfs backend.
    pub btrfs: BtrfsConfig,
    /// Options of the ZFS backend.
    pub zfs: ZfsConfig,
    /// Options of the embedded loop image used when the root is not on btrfs.
    pub embedded: EmbeddedConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            log_level: None,
            metrics_address: None,
            backend: BackendKind::default(),
            btrfs: BtrfsConfig::default(),
            zfs: ZfsConfig::default(),
            embedded: EmbeddedConfig::default(),
        }
    }
}

/// The filesystem backend that stores snapshots.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// btrfs subvolumes and snapshots.
    #[default]
    Btrfs,
    /// ZFS datasets and clones under `zfs.dataset`.
    Zfs,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Btrfs => "btrfs",
            BackendKind::Zfs => "zfs",
        })
    }
}

/// Options of the btrfs backend.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BtrfsConfig {
    /// Which kind of btrfs quota accounting tracks snapshot usage.
    pub quota: QuotaSetting,
    /// Make a snapshot's data durable (`syncfs`) before its Commit is
    /// acknowledged. Off only for throwaway hosts: a power cut can then
    /// leave acknowledged layers torn (docs/design.md, "Durability").
    pub commit_sync: bool,
}

impl Default for BtrfsConfig {
    fn default() -> Self {
        BtrfsConfig {
            quota: QuotaSetting::default(),
            commit_sync: true,
        }
    }
}

/// Options of the ZFS backend.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ZfsConfig {
    /// The parent dataset (`pool/cowsnap`) under which cowsnap keeps one
    /// dataset per snapshot. Required with `backend = "zfs"`; created when
    /// missing if its own parent exists.
    pub dataset: Option<String>,
}

/// The `btrfs.quota` option: which quota accounting to enable.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QuotaSetting {
    /// Simple quotas where the running kernel supports them, full qgroups
    /// otherwise.
    #[default]
    Auto,
    /// Simple quotas (Linux 6.7+): cheap, but they charge an extent to the
    /// subvolume that first wrote it, so a snapshot's usage counts only what
    /// it wrote itself.
    Simple,
    /// Full qgroups: exact shared/exclusive accounting, at the price of
    /// slower snapshot deletion and commits on large filesystems.
    Full,
}

/// The quota accounting actually used, once `auto` has been decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMode {
    /// btrfs simple quotas.
    Simple,
    /// btrfs full qgroups.
    Full,
}

impl QuotaSetting {
    /// Decides `auto` given whether the kernel supports simple quotas (see
    /// [`kernel_supports_simple_quota`]); the explicit settings are kept as
    /// they are, so an unsupported `simple` fails later with the kernel's
    /// error instead of silently becoming `full`.
    pub fn resolve(self, kernel_has_simple_quota: bool) -> QuotaMode {
        match self {
            QuotaSetting::Auto if kernel_has_simple_quota => QuotaMode::Simple,
            QuotaSetting::Auto => QuotaMode::Full,
            QuotaSetting::Simple => QuotaMode::Simple,
            QuotaSetting::Full => QuotaMode::Full,
        }
    }
}

/// Whether the running kernel can enable btrfs simple quotas, as advertised
/// by `/sys/fs/btrfs/features/simple_quota`. (That file exists only once the
/// btrfs module is loaded, which mounting any btrfs filesystem does.)
pub fn kernel_supports_simple_quota() -> bool {
    Path::new(SIMPLE_QUOTA_FEATURE).exists()
}

/// Options of the embedded loop image: a btrfs filesystem in a sparse file,
/// mounted on the root when the root is not on btrfs, so that cowsnap works
/// on any host whose kernel has btrfs.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Create (or reuse) and mount the image when the root is not on btrfs.
    /// When false, a root that is not on btrfs is an error. Default true.
    pub enabled: bool,
    /// Path of the image file. Default: beside the root, the root's path
    /// with `.img` appended (see [`Config::embedded_image_path`]).
    pub image: Option<PathBuf>,
    /// Size of the image when it is created. The file is sparse, so disk
    /// space is used only as data is written. An existing image keeps the
    /// size it was created with. Default 20 GiB.
    pub size: ByteSize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            enabled: true,
            image: None,
            size: DEFAULT_EMBEDDED_SIZE,
        }
    }
}

/// A size in bytes, written in the configuration as an integer number of
/// bytes or as a string with a binary unit: `"20G"`, `"20GiB"`, `"20GB"`,
/// `"512M"`, `"1073741824"`. Units are K, M, G and T, case-insensitive,
/// optionally followed by `B` or `iB`, and always powers of 1024 (`"1GB"` is
/// 2^30 bytes), because that is what disk tools like `truncate` mean too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Why a size string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {input:?}: {reason} (expected e.g. \"20G\", \"512MiB\" or a number of bytes)"
)]
pub struct ParseByteSizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = ParseByteSizeError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason| ParseByteSizeError {
            input: input.to_owned(),
            reason,
        };
        let text = input.trim();
        let digits_end = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(digits_end);
        if digits.is_empty() {
            return Err(fail("it must start with a whole number"));
        }
        let multiplier = match unit.trim_start().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => KIB,
            "m" | "mb" | "mib" => MIB,
            "g" | "gb" | "gib" => GIB,
            "t" | "tb" | "tib" => TIB,
            _ => return Err(fail("unknown unit (use K, M, G or T)")),
        };
        let number: u64 = digits
            .parse()
            .map_err(|_| fail("the number is too large"))?;
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| fail("the size does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    /// Writes the size with the largest binary unit that divides it exactly
    /// (`20GiB`, `1536MiB`, `1000`), so the output parses back to the same
    /// value and is still readable in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
        for (size, name) in units {
            if self.0 != 0 && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    /// Serialized as a string: TOML integers are signed 64-bit and would not
    /// hold every u64, and `"20GiB"` reads better than 21474836480.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

/// Accepts both spellings of a size: an integer or a string with a unit.
struct ByteSizeVisitor;

impl serde::de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size such as \"20G\", \"512MiB\" or a number of bytes")
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(value))
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<ByteSize, E> {
        u64::try_from(value)
            .map(ByteSize)
            .map_err(|_| E::custom(format!("invalid size {value}: it must not be negative")))
    }

    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<ByteSize, E> {
        value.parse().map_err(E::custom)
    }
}

impl Config {
    /// Reads and parses the TOML file at `path`. Missing keys take their
    /// defaults; unknown keys are rejected so that a misspelt option is not
    /// silently ignored. Parse errors name the file, the line and the column.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Loads the configuration file that `cowsnap serve` should use: `given`
    /// (from `--config`) if any, which must exist; otherwise
    /// [`DEFAULT_CONFIG_PATH`] if it exists; otherwise the defaults. Returns
    /// the path of the file that was read, if one was, for the startup log.
    pub fn load_default_or_given(
        given: Option<&Path>,
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        Config::load_given_or(given, Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Config::load_default_or_given`] with the default path as a parameter,
    /// so tests need not touch `/etc`.
    fn load_given_or(
        given: Option<&Path>,
        default_path: &Path,
    ) -> Result<(Config, Option<PathBuf>), ConfigError> {
        if let Some(path) = given {
            return Ok((Config::load(path)?, Some(path.to_owned())));
        }
        // Read first and look at the error, rather than testing existence
        // first: only "not found" means "no file"; a file that exists but
        // cannot be read must be reported, not skipped.
        match std::fs::read_to_string(default_path) {
            Ok(text) => Ok((
                Config::parse(&text, default_path)?,
                Some(default_path.to_owned()),
            )),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok((Config::default(), None)),
            Err(source) => Err(ConfigError::Read {
                path: default_path.to_owned(),
                source,
            }),
        }
    }

    fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Applies the command-line flags, which win over the file.
    pub fn apply_overrides(&mut self, root: Option<PathBuf>, address: Option<PathBuf>) {
        if let Some(root) = root {
            self.root = root;
        }
        if let Some(address) = address {
            self.address = address;
        }
    }

    /// Checks the assembled configuration: the root, the socket and the
    /// image are absolute paths (the daemon must not depend on the directory
    /// it was started from), the root is not `/`, the image is not inside the
    /// root (mounting the image on the root would hide it), the socket path
    /// fits a Unix socket address, the image is large enough for
    /// `mkfs.btrfs`, and the ZFS backend has a well-formed `zfs.dataset`.
    /// Reports the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |option, reason: String| Err(ConfigError::Invalid { option, reason });

        if !self.root.is_absolute() {
            return invalid(
                "root",
                format!("{} is not an absolute path", self.root.display()),
            );
        }
        if self.root.parent().is_none() {
            return invalid(
                "root",
                "the root must be a directory of its own, not /".to_owned(),
            );
        }
        if !self.address.is_absolute() {
            return invalid(
                "address",
                format!("{} is not an absolute path", self.address.display()),
            );
        }
        let address_len = self.address.as_os_str().len();
        if address_len > MAX_SOCKET_PATH_LEN {
            return invalid(
                "address",
                format!(
                    "{} is {address_len} bytes long; a Unix socket path can have at most \
                     {MAX_SOCKET_PATH_LEN}",
                    self.address.display()
                ),
            );
        }
        if self.backend == BackendKind::Zfs {
            match &self.zfs.dataset {
                None => {
                    return invalid(
                        "zfs.dataset",
                        "the zfs backend needs a parent dataset, e.g. \"tank/cowsnap\"".to_owned(),
                    );
                }
                Some(dataset) => {
                    if let Err(reason) = crate::backend::zfs::cmd::validate_dataset_name(dataset) {
                        return invalid("zfs.dataset", reason);
                    }
                }
            }
        }
        if let Some(image) = &self.embedded.image {
            if !image.is_absolute() {
                return invalid(
                    "embedded.image",
                    format!("{} is not an absolute path", image.display()),
                );
            }
            if normalize(image).starts_with(normalize(&self.root)) {
                return invalid(
                    "embedded.image",
                    format!(
                        "{} is inside the root {}; the image is mounted on the root and \
                         must live outside it",
                        image.display(),
                        self.root.display()
                    ),
                );
            }
        }
        if self.embedded.size < MIN_EMBEDDED_SIZE {
            return invalid(
                "embedded.size",
                format!(
                    "{} is too small; mkfs.btrfs needs at least {MIN_EMBEDDED_SIZE}",
                    self.embedded.size
                ),
            );
        }
        Ok(())
    }

    /// The path of the embedded image: `embedded.image` if set, otherwise
    /// the root's path with `.img` appended (`/var/lib/cowsnap` ->
    /// `/var/lib/cowsnap.img`), which puts it beside the root on the same
    /// filesystem and outside the directory it will be mounted on.
    pub fn embedded_image_path(&self) -> PathBuf {
        if let Some(image) = &self.embedded.image {
            return image.clone();
        }
        // Normalize first so that "/var/lib/cowsnap/" does not become
        // "/var/lib/cowsnap/.img", inside the root.
        let mut path = normalize(&self.root).into_os_string();
        path.push(".img");
        PathBuf::from(path)
    }

    /// The `tracing` EnvFilter directive to log with: `RUST_LOG` if it is
    /// set and not empty, else `log_level`, else `"info"`.
    pub fn log_directive(&self) -> String {
        self.log_directive_given(std::env::var("RUST_LOG").ok())
    }

    /// [`Config::log_directive`] with `RUST_LOG` as a parameter, so tests
    /// need not change the process environment.
    fn log_directive_given(&self, rust_log: Option<String>) -> String {
        match rust_log {
            Some(value) if !value.trim().is_empty() => value,
            _ => self.log_level.clone().unwrap_or_else(|| "info".to_owned()),
        }
    }

    /// A commented configuration file documenting every option. Every value
    /// in it is the default, so it parses to [`Config::default`] and can be
    /// installed as `/etc/cowsnap/config.toml` unchanged.
    pub fn example_toml() -> &'static str {
        EXAMPLE_TOML
    }
}

/// Drops `.` components and trailing slashes (purely lexically; `..` is
/// kept) so that paths can be compared and extended.
fn normalize(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

const EXAMPLE_TOML: &str = r#"# cowsnap configuration: /etc/cowsnap/config.toml
#
# Every value below is the default; delete any line to keep its default.
# `cowsnap serve --root DIR --address SOCKET --config FILE` flags override
# this file. Unknown keys are an error, so a misspelt option is reported.

# Directory holding the metadata and, with the btrfs backend, the snapshots.
# For btrfs it must be on btrfs, or cowsnap mounts the embedded image on it
# (see [embedded] below). For ZFS it holds only the metadata.
root = "/var/lib/cowsnap"

# Unix socket serving containerd's snapshots API. Point containerd at it with
#   [proxy_plugins.cowsnap]
#     type = "snapshot"
#     address = "/run/cowsnap/cowsnap.sock"
# At most 107 bytes long.
address = "/run/cowsnap/cowsnap.sock"

# Log filter, in tracing's EnvFilter syntax ("info", "debug",
# "cowsnap=debug,info"). The RUST_LOG environment variable wins if set.
# Unset means "info".
# log_level = "info"

# Prometheus metrics endpoint (GET /metrics), as host:port. Off when unset.
# metrics_address = "127.0.0.1:9337"

# Filesystem backend: "btrfs" (subvolumes under the root) or "zfs"
# (datasets under zfs.dataset, see [zfs] below).
backend = "btrfs"

[btrfs]
# Quota accounting used to report snapshot disk usage:
#   "auto"   simple quotas if the kernel supports them (Linux 6.7+, i.e.
#            /sys/fs/btrfs/features/simple_quota exists), else full qgroups
#   "simple" simple quotas: cheap; an extent is charged to the subvolume
#            that first wrote it
#   "full"   full qgroups: exact shared/exclusive numbers, slower on large
#            filesystems
quota = "auto"

# Write a snapshot's data to disk (one syncfs(2) of the filesystem, shared
# by concurrent commits) before its Commit is acknowledged. containerd never
# re-checks a committed layer, so with false a power cut soon after an image
# pull can leave layers with empty or missing files. false only on hosts
# whose snapshots are throwaway.
commit_sync = true

[zfs]
# The parent dataset for backend = "zfs": cowsnap keeps its datasets in
# <dataset>/active, /view and /committed (mountpoint=legacy). Created when
# missing if its pool or parent dataset exists. No default.
# dataset = "tank/cowsnap"

[embedded]
# Used with the btrfs backend only.
# When the root is not on btrfs, create a sparse btrfs image file, mount it
# (through a loop device) on the root, and reuse it on later starts. Set to
# false to require a root that is already on btrfs.
enabled = true

# Image file. Unset means beside the root: the root's path + ".img"
# (/var/lib/cowsnap.img). It must be outside the root.
# image = "/var/lib/cowsnap.img"

# Size of the image when cowsnap creates it. The file is sparse: disk space
# is used only as data is written. An existing image keeps its size.
# Binary units: "512M", "20G", "20GiB", "1T", or a number of bytes.
# At least 256M.
size = "20G"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop, so tests leave nothing behind
    /// even when they fail.
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new(name: &str) -> ScratchDir {
            let dir = std::env::temp_dir()
                .join(format!("cowsnap-config-test-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("create scratch dir");
            ScratchDir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write test file");
            path
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The defaults, to be changed one field at a time by each test.
    fn defaults() -> Config {
        Config::default()
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let config = Config::default();
        assert_eq!(config.root, Path::new("/var/lib/cowsnap"));
        assert_eq!(config.address, Path::new("/run/cowsnap/cowsnap.sock"));
        assert_eq!(config.log_level, None);
        assert_eq!(config.backend, BackendKind::Btrfs);
        assert_eq!(config.btrfs.quota, QuotaSetting::Auto);
        assert!(config.embedded.enabled);
        assert_eq!(config.embedded.image, None);
        assert_eq!(config.embedded.size, ByteSize(20 * 1024 * 1024 * 1024));
        assert_eq!(
            config.embedded_image_path(),
            Path::new("/var/lib/cowsnap.img")
        );
        config.validate().expect("the defaults are valid");
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(parse("").expect("parse"), Config::default());
    }

    #[test]
    fn example_parses_to_the_defaults() {
        assert_eq!(
            parse(Config::example_toml()).expect("example parses"),
            Config::default()
        );
    }

    #[test]
    fn example_commented_options_parse_when_uncommented() {
        // The options left commented out (they have no default value to
        // write) must still be spelt correctly.
        let uncommented = Config::example_toml()
            .replace("# log_level = ", "log_level = ")
            .replace("# image = ", "image = ")
            .replace("# dataset = ", "dataset = ")
            .replace("# metrics_address = ", "metrics_address = ");
        let config = parse(&uncommented).expect("uncommented example parses");
        assert_eq!(config.log_level.as_deref(), Some("info"));
        assert_eq!(config.metrics_address.as_deref(), Some("127.0.0.1:9337"));
        assert_eq!(
            config.embedded.image.as_deref(),
            Some(Path::new("/var/lib/cowsnap.img"))
        );
    }

    #[test]
    fn serialized_config_parses_back_unchanged() {
        let mut config = defaults();
        config.log_level = Some("cowsnap=debug".to_owned());
        config.embedded.image = Some(PathBuf::from("/srv/cowsnap.img"));
        config.embedded.size = ByteSize(1536 * MIB + 1);
        config.btrfs.quota = QuotaSetting::Full;
        let text = toml::to_string(&config).expect("serialize");
        assert_eq!(parse(&text).expect("parse back"), config);
    }

    #[test]
    fn file_values_override_defaults_and_flags_override_file() {
        let dir = ScratchDir::new("precedence");
        let path = dir.write(
            "config.toml",
            "root = \"/srv/file-root\"\naddress = \"/run/file.sock\"\n\
             log_level = \"debug\"\n[embedded]\nsize = \"1G\"\n",
        );
        let (mut config, read) = Config::load_default_or_given(Some(&path)).expect("load");
        assert_eq!(read.as_deref(), Some(path.as_path()));
        assert_eq!(config.root, Path::new("/srv/file-root"));
        assert_eq!(config.log_level.as_deref(), Some("debug"));
        assert_eq!(config.embedded.size, ByteSize(GIB));
        // Keys absent from the file keep their defaults.
        assert_eq!(config.btrfs.quota, QuotaSetting::Auto);

        config.apply_overrides(Some(PathBuf::from("/srv/flag-root")), None);
        assert_eq!(config.root, Path::new("/srv/flag-root"));
        assert_eq!(config.address, Path::new("/run/file.sock"));
        // The default image follows the overridden root.
        assert_eq!(
            config.embedded_image_path(),
            Path::new("/srv/flag-root.img")
        );

        config.apply_overrides(None, Some(PathBuf::from("/run/flag.sock")));
        assert_eq!(config.root, Path::new("/srv/flag-root"));
        assert_eq!(config.address, Path::new("/run/flag.sock"));
    }

    #[test]
    fn missing_given_config_is_an_error() {
        let dir = ScratchDir::new("missing-given");
        let path = dir.0.join("absent.toml");
        let err = Config::load_default_or_given(Some(&path)).expect_err("must fail");
        match &err {
            ConfigError::Read { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }

    #[test]
    fn missing_default_config_gives_the_defaults() {
        let dir = ScratchDir::new("missing-default");
        let (config, read) = Config::load_given_or(None, &dir.0.join("config.toml")).expect("load");
        assert_eq!(config, Config::default());
        assert_eq!(read, None);
    }

    #[test]
    fn existing_default_config_is_read() {
        let dir = ScratchDir::new("existing-default");
        let path = dir.write(
            "config.toml",
            "backend = \"btrfs\"\n[btrfs]\nquota = \"full\"\n",
        );
        let (config, read) = Config::load_given_or(None, &path).expect("load");
        assert_eq!(config.btrfs.quota, QuotaSetting::Full);
        assert!(
            config.btrfs.commit_sync,
            "durability stays on unless turned off"
        );
        assert_eq!(read.as_deref(), Some(path.as_path()));
    }

    #[test]
    fn commit_sync_can_be_turned_off_and_must_be_a_boolean() {
        let dir = ScratchDir::new("commit-sync");
        let path = dir.write("config.toml", "[btrfs]\ncommit_sync = false\n");
        let (config, _) = Config::load_given_or(None, &path).expect("load");
        assert!(!config.btrfs.commit_sync);
        let path = dir.write("bad.toml", "[btrfs]\ncommit_sync = \"no\"\n");
        let err = Config::load_given_or(None, &path).expect_err("a string is not a boolean");
        assert!(err.to_string().contains("commit_sync"), "{err}");
    }

    #[test]
    fn given_config_wins_over_default_config() {
        let dir = ScratchDir::new("given-wins");
        let default = dir.write("default.toml", "root = \"/srv/default\"\n");
        let given = dir.write("given.toml", "root = \"/srv/given\"\n");
        let (config, read) = Config::load_given_or(Some(&given), &default).expect("load");
        assert_eq!(config.root, Path::new("/srv/given"));
        assert_eq!(read.as_deref(), Some(given.as_path()));
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name_and_line() {
        let err = parse("root = \"/srv/x\"\nrot = \"/srv/y\"\n").expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("test.toml"), "{message}");
        assert!(message.contains("unknown field `rot`"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn unknown_key_in_a_table_is_rejected() {
        let err = parse("[embedded]\nenable = false\n").expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("unknown field `enable`"), "{message}");
        assert!(
            message.contains("`enabled`"),
            "lists the valid keys: {message}"
        );
    }

    #[test]
    fn unknown_enum_values_are_rejected() {
        let err = parse("backend = \"ext4\"\n").expect_err("must fail");
        assert!(err.to_string().contains("unknown variant `ext4`"), "{err}");
        let err = parse("[btrfs]\nquota = \"yes\"\n").expect_err("must fail");
        assert!(err.to_string().contains("unknown variant `yes`"), "{err}");
    }

    #[test]
    fn syntax_error_reports_line_and_column() {
        let err = parse("root = \"/srv/x\"\naddress = \n").expect_err("must fail");
        let message = err.to_string();
        assert!(message.contains("line 2, column"), "{message}");
    }

    #[test]
    fn size_strings_parse_with_binary_units() {
        let table: &[(&str, u64)] = &[
            ("1073741824", GIB),
            ("0", 0),
            ("512", 512),
            ("512B", 512),
            ("1K", KIB),
            ("1k", KIB),
            ("1KB", KIB),
            ("1KiB", KIB),
            ("512M", 512 * MIB),
            ("512MiB", 512 * MIB),
            ("512mb", 512 * MIB),
            ("20G", 20 * GIB),
            ("20GiB", 20 * GIB),
            ("20GB", 20 * GIB),
            ("20 GiB", 20 * GIB),
            ("  20G  ", 20 * GIB),
            ("2T", 2 * TIB),
            ("2TiB", 2 * TIB),
            ("16777215T", 16_777_215 * TIB),
        ];
        for &(input, expected) in table {
            assert_eq!(
                input.parse::<ByteSize>(),
                Ok(ByteSize(expected)),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn bad_size_strings_are_rejected() {
        let table = [
            "",
            "G",
            "-1G",
            "1.5G",
            "20X",
            "20GiBs",
            "20Gi",
            "20 G B",
            "0x100",
            "16777216T",
            "99999999999999999999",
        ];
        for input in table {
            let err = input
                .parse::<ByteSize>()
                .expect_err(&format!("{input:?} must be rejected"));
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "message quotes the input: {err}"
            );
        }
    }

    #[test]
    fn size_accepts_toml_integers_and_strings() {
        let config = parse("[embedded]\nsize = 1073741824\n").expect("integer");
        assert_eq!(config.embedded.size, ByteSize(GIB));
        let config = parse("[embedded]\nsize = \"300M\"\n").expect("string");
        assert_eq!(config.embedded.size, ByteSize(300 * MIB));
    }

    #[test]
    fn bad_sizes_in_toml_are_reported_with_their_line() {
        for (text, expected) in [
            ("[embedded]\nsize = \"20X\"\n", "invalid size \"20X\""),
            ("[embedded]\nsize = -5\n", "must not be negative"),
            ("[embedded]\nsize = 1.5\n", "a size such as"),
            ("[embedded]\nsize = true\n", "a size such as"),
        ] {
            let message = parse(text).expect_err(text).to_string();
            assert!(message.contains(expected), "{text:?}: {message}");
            assert!(message.contains("line 2"), "{text:?}: {message}");
        }
    }

    #[test]
    fn size_display_parses_back() {
        for bytes in [0, 1, 1000, KIB, 1536 * MIB, 20 * GIB, 3 * TIB, u64::MAX] {
            let shown = ByteSize(bytes).to_string();
            assert_eq!(shown.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{shown}");
        }
        assert_eq!(ByteSize(20 * GIB).to_string(), "20GiB");
        assert_eq!(ByteSize(1536 * MIB).to_string(), "1536MiB");
    }

    #[test]
    fn image_path_defaults_beside_the_root() {
        let mut config = defaults();
        config.root = PathBuf::from("/data/snap/");
        assert_eq!(config.embedded_image_path(), Path::new("/data/snap.img"));
        config.embedded.image = Some(PathBuf::from("/images/cowsnap.img"));
        assert_eq!(
            config.embedded_image_path(),
            Path::new("/images/cowsnap.img")
        );
    }

    fn invalid_option(config: &Config) -> (&'static str, String) {
        match config.validate() {
            Err(ConfigError::Invalid { option, reason }) => (option, reason),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn validate_rejects_relative_paths() {
        let mut config = defaults();
        config.root = PathBuf::from("var/lib/cowsnap");
        assert_eq!(invalid_option(&config).0, "root");

        let mut config = defaults();
        config.address = PathBuf::from("cowsnap.sock");
        assert_eq!(invalid_option(&config).0, "address");

        let mut config = defaults();
        config.embedded.image = Some(PathBuf::from("cowsnap.img"));
        assert_eq!(invalid_option(&config).0, "embedded.image");
    }

    #[test]
    fn validate_rejects_slash_as_root() {
        let mut config = defaults();
        config.root = PathBuf::from("/");
        assert_eq!(invalid_option(&config).0, "root");
    }

    #[test]
    fn validate_rejects_image_inside_root() {
        let mut config = defaults();
        config.embedded.image = Some(PathBuf::from("/var/lib/cowsnap/./disk.img"));
        let (option, reason) = invalid_option(&config);
        assert_eq!(option, "embedded.image");
        assert!(reason.contains("inside the root"), "{reason}");
        // A sibling whose name merely starts with the root's is fine.
        config.embedded.image = Some(PathBuf::from("/var/lib/cowsnap.img"));
        config.validate().expect("sibling image is valid");
    }

    #[test]
    fn validate_limits_socket_path_length() {
        let mut config = defaults();
        let name = "s".repeat(MAX_SOCKET_PATH_LEN - "/run/".len());
        config.address = PathBuf::from(format!("/run/{name}"));
        assert_eq!(config.address.as_os_str().len(), MAX_SOCKET_PATH_LEN);
        config.validate().expect("107 bytes fit");

        config.address = PathBuf::from(format!("/run/{name}x"));
        let (option, reason) = invalid_option(&config);
        assert_eq!(option, "address");
        assert!(reason.contains("108 bytes"), "{reason}");
    }

    #[test]
    fn validate_enforces_minimum_image_size() {
        let mut config = defaults();
        config.embedded.size = ByteSize(256 * MIB);
        config.validate().expect("256 MiB is enough");

        config.embedded.size = ByteSize(256 * MIB - 1);
        let (option, reason) = invalid_option(&config);
        assert_eq!(option, "embedded.size");
        assert!(reason.contains("256MiB"), "{reason}");
    }

    #[test]
    fn zfs_backend_needs_a_well_formed_dataset() {
        let config = parse("backend = \"zfs\"\n").expect("zfs parses");
        assert_eq!(config.backend, BackendKind::Zfs);
        let (option, reason) = invalid_option(&config);
        assert_eq!(option, "zfs.dataset");
        assert!(reason.contains("needs a parent dataset"), "{reason}");

        let config =
            parse("backend = \"zfs\"\n[zfs]\ndataset = \"tank/cowsnap\"\n").expect("parse");
        assert_eq!(config.zfs.dataset.as_deref(), Some("tank/cowsnap"));
        config.validate().expect("a dataset makes zfs valid");

        let config =
            parse("backend = \"zfs\"\n[zfs]\ndataset = \"/tank/cowsnap\"\n").expect("parse");
        assert_eq!(invalid_option(&config).0, "zfs.dataset");
        // The btrfs backend ignores the zfs section.
        let config = parse("[zfs]\ndataset = \"tank/x\"\n").expect("parse");
        config.validate().expect("btrfs ignores zfs.dataset");
    }

    #[test]
    fn rust_log_wins_over_log_level() {
        let mut config = defaults();
        assert_eq!(config.log_directive_given(None), "info");
        config.log_level = Some("cowsnap=debug".to_owned());
        assert_eq!(config.log_directive_given(None), "cowsnap=debug");
        assert_eq!(
            config.log_directive_given(Some(String::new())),
            "cowsnap=debug"
        );
        assert_eq!(
            config.log_directive_given(Some("trace".to_owned())),
            "trace"
        );
    }

    #[test]
    fn auto_quota_follows_kernel_support() {
        assert_eq!(QuotaSetting::Auto.resolve(true), QuotaMode::Simple);
        assert_eq!(QuotaSetting::Auto.resolve(false), QuotaMode::Full);
        assert_eq!(QuotaSetting::Simple.resolve(false), QuotaMode::Simple);
        assert_eq!(QuotaSetting::Full.resolve(true), QuotaMode::Full);
    }
}
