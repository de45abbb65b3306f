//! Test-only crash injection at the steps of the crash protocol
//! (docs/design.md lists every point by name).
//!
//! Built only with the `failpoints` cargo feature; without it [`hit`] is an
//! empty inline function. With it, the environment variable
//! `COWSNAP_FAILPOINTS` arms points, e.g.
//! `COWSNAP_FAILPOINTS="commit.after_fs=crash,remove.after_meta=error"`:
//! `crash` kills the process with SIGKILL on the spot (no destructor, no
//! flush: what a crash leaves), `error` makes the step fail with an
//! internal error, `pause` holds the call there for 2 seconds (for tests of
//! what others see in the middle of a step).

use crate::error::Result;

/// Every failpoint name, in protocol order. Tests iterate over this list.
pub const POINTS: &[&str] = &[
    "create.after_fs",
    "create.after_meta",
    "commit.after_rename",
    "commit.after_fs",
    "commit.after_meta",
    "remove.after_meta",
    "remove.after_fs",
];

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::OnceLock;

    use crate::error::{Error, Result};

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Action {
        Crash,
        Error,
        Pause,
    }

    fn armed() -> &'static HashMap<String, Action> {
        static ARMED: OnceLock<HashMap<String, Action>> = OnceLock::new();
        ARMED.get_or_init(|| {
            let spec = std::env::var("COWSNAP_FAILPOINTS").unwrap_or_default();
            spec.split(',')
                .filter_map(|item| {
                    let (name, action) = item.trim().split_once('=')?;
                    let action = match action.trim() {
                        "crash" => Action::Crash,
                        "error" => Action::Error,
                        "pause" => Action::Pause,
                        _ => return None,
                    };
                    Some((name.trim().to_owned(), action))
                })
                .collect()
        })
    }

    pub fn hit(name: &str) -> Result<()> {
        debug_assert!(super::POINTS.contains(&name), "unknown failpoint {name}");
        match armed().get(name) {
            None => Ok(()),
            Some(Action::Error) => Err(Error::Internal(format!("failpoint {name}"))),
            Some(Action::Pause) => {
                tracing::warn!(failpoint = name, "failpoint: pausing 2 s");
                std::thread::sleep(std::time::Duration::from_secs(2));
                Ok(())
            }
            Some(Action::Crash) => {
                tracing::warn!(failpoint = name, "failpoint: killing the daemon");
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                // SIGKILL cannot be caught; this is not reached.
                std::process::abort()
            }
        }
    }
}

/// Runs failpoint `name` (see the module documentation).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> Result<()> {
    imp::hit(name)
}

/// Runs failpoint `name`: nothing, in a build without the `failpoints`
/// feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> Result<()> {
    Ok(())
}
