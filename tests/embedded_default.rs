//! The embedded default, through the real daemon: a root that is not on
//! btrfs gets a sparse btrfs image beside it, mounted on it, reused on
//! restart and unmounted at a clean exit. Run as root; /var/tmp is not
//! btrfs on the test machines (the test checks and skips otherwise).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cowsnap::embedded::is_on_btrfs;
use cowsnap::proto::containerd::services::snapshots::v1 as pb;

/// A temp dir on a non-btrfs filesystem, with everything mounted under it
/// unmounted when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.0.join("root");
        for _ in 0..3 {
            if nix::mount::umount2(&root, nix::mount::MntFlags::empty()).is_err() {
                break;
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn(root: &Path, socket: &Path, config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .args(["serve", "--root"])
        .arg(root)
        .arg("--address")
        .arg(socket)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn wait_listening(socket: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "daemon exited with {st}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "daemon did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn terminate(child: &mut Child) -> bool {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    child.wait().unwrap().success()
}

#[tokio::test]
async fn root_off_btrfs_gets_a_reusable_loop_image() {
    let base = PathBuf::from(format!(
        "/var/tmp/cowsnap-embedded-test-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&base).unwrap();
    let scratch = Scratch(base.clone());
    if is_on_btrfs(&base).unwrap() {
        eprintln!("skipped: /var/tmp is on btrfs here");
        return;
    }
    let root = base.join("root");
    let image = base.join("root.img");
    let socket = base.join("s.sock");
    let log = base.join("daemon.log");
    let config = base.join("config.toml");
    std::fs::write(&config, "[embedded]\nsize = \"512M\"\n").unwrap();

    let mut child = spawn(&root, &socket, &config, &log);
    wait_listening(&socket, &mut child, &log).await;
    assert!(is_on_btrfs(&root).unwrap(), "root is now a btrfs mount");
    let md = std::fs::metadata(&image).unwrap();
    assert_eq!(md.len(), 512 << 20, "image has the configured size");
    assert!(
        md.blocks() * 512 < md.len() / 4,
        "image is sparse: {} blocks",
        md.blocks()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("created a sparse btrfs image"),
        "logged what it did:\n{text}"
    );

    let mut c = cowsnap::client::connect(&socket).await.unwrap();
    let m = c
        .prepare(pb::PrepareSnapshotRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    std::fs::write(Path::new(&m[0].source).join("file"), b"kept").unwrap();
    c.commit(pb::CommitSnapshotRequest {
        name: "layer".into(),
        key: "k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(c);
    assert!(terminate(&mut child), "clean exit");
    assert!(!is_on_btrfs(&root).unwrap(), "image unmounted at exit");

    // Restart: the same image is mounted again and the snapshot is there.
    let mut child = spawn(&root, &socket, &config, &log);
    wait_listening(&socket, &mut child, &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("mounted the existing embedded btrfs image"),
        "{text}"
    );
    let mut c = cowsnap::client::connect(&socket).await.unwrap();
    let m = c
        .view(pb::ViewSnapshotRequest {
            key: "v".into(),
            parent: "layer".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(
        std::fs::read(Path::new(&m[0].source).join("file")).unwrap(),
        b"kept"
    );
    drop(c);
    assert!(terminate(&mut child));
    drop(scratch);
    assert!(!base.exists());
}
