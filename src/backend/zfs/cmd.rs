//! The `zfs` command line: the only place the ZFS backend runs a program.
//!
//! cowsnap drives the `zfs` tool (zfsutils) instead of linking libzfs, so
//! the binary starts on hosts without ZFS libraries and the backend speaks
//! the interface OpenZFS keeps stable: scripted output with `-H` (no
//! header, tab-separated) and `-p` (exact numbers). Error text is matched
//! only to recognise "does not exist" and "out of space"; the command runs
//! with `LC_ALL=C` so that text is the untranslated one.

use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// How the `zfs` program is found: its path, or a name looked up in PATH.
#[derive(Debug, Clone)]
pub struct ZfsTool {
    program: PathBuf,
}

/// A failed `zfs` command: its arguments and what it printed.
#[derive(Debug)]
pub struct CommandError {
    /// The command line, for messages.
    pub command: String,
    /// Trimmed standard error (or how starting it failed).
    pub stderr: String,
    /// Whether the program could not be started at all.
    pub not_started: bool,
}

impl CommandError {
    /// True when ZFS said the named dataset or snapshot does not exist.
    pub fn is_missing(&self) -> bool {
        self.stderr.contains("does not exist")
            || self.stderr.contains("no such pool")
            || self.stderr.contains("could not find any snapshots")
    }

    /// True when the pool ran out of space (or a quota was hit).
    pub fn is_out_of_space(&self) -> bool {
        self.stderr.contains("out of space") || self.stderr.contains("quota exceeded")
    }

    /// The core's error: not-found, out-of-space and the rest keep the
    /// command and ZFS's own words.
    pub fn into_error(self) -> Error {
        let source = if self.is_missing() {
            io::Error::new(io::ErrorKind::NotFound, self.stderr)
        } else if self.is_out_of_space() {
            return Error::io(
                format!("{}: {}", self.command, self.stderr),
                io::Error::from_raw_os_error(libc::ENOSPC),
            );
        } else {
            io::Error::other(self.stderr)
        };
        Error::io(self.command, source)
    }
}

impl Default for ZfsTool {
    /// `zfs` from PATH, else from the sbin directories a service's PATH
    /// may lack (Debian installs it as /sbin/zfs).
    fn default() -> Self {
        ZfsTool {
            program: find_program("zfs"),
        }
    }
}

/// Path of an admin program: the name itself when PATH has it, else the
/// first of /usr/sbin, /sbin that does.
pub fn find_program(name: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()));
    if !in_path {
        for dir in ["/usr/sbin", "/sbin"] {
            let candidate = std::path::Path::new(dir).join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

impl ZfsTool {
    /// Runs `zfs ARGS...` and returns its standard output.
    pub fn run<S: AsRef<OsStr>>(&self, args: &[S]) -> std::result::Result<String, CommandError> {
        match self.run_partial(args)? {
            (stdout, None) => Ok(stdout),
            (_, Some(e)) => Err(e),
        }
    }

    fn start_error(&self, command: String, e: io::Error) -> CommandError {
        CommandError {
            command,
            stderr: if e.kind() == io::ErrorKind::NotFound {
                format!(
                    "{} not found: install the ZFS userland (zfsutils-linux)",
                    self.program.display()
                )
            } else {
                e.to_string()
            },
            not_started: true,
        }
    }

    /// Runs `zfs ARGS...` and returns its standard output even when it
    /// fails, with the failure: `zfs list A B` prints the datasets that
    /// exist and fails for the others.
    pub fn run_partial<S: AsRef<OsStr>>(
        &self,
        args: &[S],
    ) -> std::result::Result<(String, Option<CommandError>), CommandError> {
        let command = self.describe(args);
        let out = Command::new(&self.program)
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.start_error(command.clone(), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return Ok((stdout, None));
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = format!("exited with {}", out.status);
        }
        Ok((
            stdout,
            Some(CommandError {
                command,
                stderr,
                not_started: false,
            }),
        ))
    }

    /// Runs the command and converts a failure into the core's error.
    pub fn run_checked<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.run(args).map_err(CommandError::into_error)
    }

    /// Reads one numeric property of a dataset (`zfs get -Hp -o value`).
    pub fn get_u64(&self, property: &str, dataset: &str) -> Result<u64> {
        let out = self.run_checked(&["get", "-H", "-p", "-o", "value", property, dataset])?;
        parse_u64(out.trim()).ok_or_else(|| {
            Error::Internal(format!(
                "zfs get {property} {dataset}: not a number: {:?}",
                out.trim()
            ))
        })
    }

    fn describe<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let mut s = self.program.display().to_string();
        for a in args {
            s.push(' ');
            s.push_str(&a.as_ref().to_string_lossy());
        }
        s
    }
}

/// Parses a `-p` number; ZFS prints `-` for a value it does not have.
pub fn parse_u64(s: &str) -> Option<u64> {
    s.parse().ok()
}

/// Splits `-H` output into rows of tab-separated fields.
pub fn rows(out: &str) -> impl Iterator<Item = Vec<&str>> {
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split('\t').collect())
}

/// Sums the `objused` column of `zfs userspace -H -p -o objused`: the
/// objects (files, directories, ...) each owner holds. `None` when the
/// pool does not account objects (a `-` value: the userobj_accounting
/// feature is off or not yet upgraded on this dataset).
pub fn sum_objused(out: &str) -> Option<u64> {
    let mut total = 0u64;
    for row in rows(out) {
        total = total.saturating_add(parse_u64(row.first()?.trim())?);
    }
    Some(total)
}

/// Checks a dataset name given in the configuration: a pool name followed
/// by `/`-separated components of ZFS's allowed characters, no snapshot or
/// bookmark part, no empty component.
pub fn validate_dataset_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("the dataset name is empty".into());
    }
    if name.len() > 200 {
        return Err(format!(
            "{name} is {} bytes long; cowsnap's datasets below it must fit ZFS's 255",
            name.len()
        ));
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err(format!(
                "{name} has an empty component (leading, trailing or double /)"
            ));
        }
        if let Some(c) = component
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
        {
            return Err(format!(
                "{name} contains {c:?}; a dataset name has letters, digits and _ - . : only"
            ));
        }
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err(format!("{name}: a pool name starts with a letter"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_names_are_checked() {
        validate_dataset_name("tank/cowsnap").unwrap();
        validate_dataset_name("tank").unwrap();
        validate_dataset_name("rpool/ROOT/var_lib-cowsnap.1:x").unwrap();
        for bad in [
            "",
            "/tank",
            "tank/",
            "tank//x",
            "tank/x@snap",
            "tank/x#b",
            "tank/a b",
            "1tank/x",
        ] {
            assert!(validate_dataset_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn objused_sums_owners_and_rejects_unknown() {
        assert_eq!(sum_objused("5\n97\n"), Some(102));
        assert_eq!(sum_objused(""), Some(0));
        assert_eq!(sum_objused("5\n-\n"), None);
    }

    #[test]
    fn missing_and_full_errors_map_to_codes() {
        let e = CommandError {
            command: "zfs destroy tank/x".into(),
            stderr: "cannot open 'tank/x': dataset does not exist".into(),
            not_started: false,
        };
        assert!(e.is_missing());
        assert!(e.into_error().is_not_found());
        let e = CommandError {
            command: "zfs clone".into(),
            stderr: "cannot create 'tank/x': out of space".into(),
            not_started: false,
        };
        assert_eq!(e.into_error().code(), crate::error::Code::ResourceExhausted);
    }

    #[test]
    fn missing_tool_is_reported_with_the_package_to_install() {
        let tool = ZfsTool {
            program: PathBuf::from("/nonexistent/zfs"),
        };
        let e = tool.run(&["list"]).unwrap_err();
        assert!(e.not_started);
        assert!(e.stderr.contains("zfsutils"), "{}", e.stderr);
    }
}
