//! The deployment files in deploy/: the systemd unit passes
//! `systemd-analyze verify` and keeps the properties the daemon relies on,
//! the shipped config is exactly `cowsnap example-config` and the daemon
//! starts with it and tells systemd when it is ready and when it stops,
//! and the containerd snippets name the plugin and the sections containerd
//! reads.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cowsnap::backend::btrfs::testutil::LoopBtrfs;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `key=value` lines of a unit file (comments and sections ignored).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!("cowsnap-{tag}.{}.{nanos}", std::process::id()));
        std::fs::create_dir(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn shipped_config_is_the_example_config() {
    let out = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("example-config")
        .output()
        .expect("cowsnap example-config");
    assert!(out.status.success(), "example-config failed: {out:?}");
    let shipped = read(&deploy("config.toml"));
    assert!(
        String::from_utf8_lossy(&out.stdout) == shipped,
        "deploy/config.toml differs from `cowsnap example-config`; regenerate it with\n  \
         cargo run -q -- example-config > deploy/config.toml"
    );
}

#[test]
fn systemd_unit_and_containerd_drop_in_pass_systemd_analyze_verify() {
    let dir = TempDir::new("unit");
    // verify insists that ExecStart exists: point it at the built binary.
    let unit = read(&deploy("cowsnap.service")).replace(
        "ExecStart=/usr/local/bin/cowsnap ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_cowsnap")),
    );
    assert!(
        unit.contains(env!("CARGO_BIN_EXE_cowsnap")),
        "ExecStart not rewritten"
    );
    std::fs::write(dir.0.join("cowsnap.service"), unit).unwrap();
    // A stand-in containerd.service, so that the drop-in is checked without
    // depending on the host's containerd unit.
    std::fs::write(
        dir.0.join("containerd.service"),
        "[Unit]\nDescription=stand-in for containerd\n\n[Service]\nType=notify\nExecStart=/bin/true\n",
    )
    .unwrap();
    let dropin = dir.0.join("containerd.service.d");
    std::fs::create_dir(&dropin).unwrap();
    std::fs::copy(
        deploy("containerd.service.d/cowsnap.conf"),
        dropin.join("cowsnap.conf"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "cowsnap.service", "containerd.service"])
        .current_dir(&dir.0)
        // Our dir first, then systemd's own (for multi-user.target etc.).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.0.display()))
        .output()
        .expect("systemd-analyze not found: install systemd (hack/deps --test does)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // verify exits 0 on unknown keys and bad values; it only warns.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
}

#[test]
fn systemd_unit_is_a_notify_service_in_the_host_mount_namespace() {
    let settings = unit_settings(&read(&deploy("cowsnap.service")));
    let get = |k: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, want) in [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecStart", "/usr/local/bin/cowsnap serve"),
        ("Before", "containerd.service"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(get(key), vec![want], "{key}= in deploy/cowsnap.service");
    }
    // The daemon waits up to 60 s for in-flight calls on SIGTERM.
    let stop: u64 = get("TimeoutStopSec")[0]
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        stop > 60,
        "TimeoutStopSec={stop} cuts the daemon's 60 s grace"
    );
    // Each of these gives the service a private mount namespace, which would
    // hide the embedded image mounted on the root from containerd; device
    // filters would block the loop devices.
    for key in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "MountFlags",
        "DeviceAllow",
        "DevicePolicy",
    ] {
        assert!(
            get(key).is_empty(),
            "{key}= must not be in deploy/cowsnap.service"
        );
    }
    let dropin = unit_settings(&read(&deploy("containerd.service.d/cowsnap.conf")));
    assert!(dropin.contains(&("Wants".into(), "cowsnap.service".into())));
    assert!(dropin.contains(&("After".into(), "cowsnap.service".into())));
}

#[test]
fn containerd_snippets_register_the_plugin_at_the_configured_socket() {
    let config: toml::Table = read(&deploy("config.toml")).parse().expect("config.toml");
    let address = config["address"].as_str().expect("address");
    for (file, version) in [("containerd-1.x.toml", 2), ("containerd-2.x.toml", 3)] {
        let path = deploy(&format!("containerd-snippets/{file}"));
        let t: toml::Table = read(&path)
            .parse()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(t["version"].as_integer(), Some(version), "{file}: version");
        let plugin = &t["proxy_plugins"]["cowsnap"];
        assert_eq!(plugin["type"].as_str(), Some("snapshot"), "{file}: type");
        assert_eq!(plugin["address"].as_str(), Some(address), "{file}: address");
        let plugins = &t["plugins"];
        if version == 2 {
            let cri = &plugins["io.containerd.grpc.v1.cri"]["containerd"];
            assert_eq!(cri["snapshotter"].as_str(), Some("cowsnap"), "{file}");
        } else {
            let images = &plugins["io.containerd.cri.v1.images"];
            assert_eq!(images["snapshotter"].as_str(), Some("cowsnap"), "{file}");
            let unpack = plugins["io.containerd.transfer.v1.local"]["unpack_config"]
                .as_array()
                .expect("unpack_config is an array of tables");
            let snapshotters: Vec<&str> = unpack
                .iter()
                .filter_map(|u| u["snapshotter"].as_str())
                .collect();
            assert!(
                snapshotters.contains(&"cowsnap"),
                "{file}: {snapshotters:?}"
            );
            assert!(
                unpack.iter().all(|u| u["platform"].as_str().is_some()),
                "{file}: platform"
            );
        }
    }
}

#[test]
fn containerd_accepts_the_1x_snippet() {
    // Debian's containerd is 1.6: `config dump` parses and merges the file
    // without starting anything.
    let Ok(out) = Command::new("containerd")
        .arg("--config")
        .arg(deploy("containerd-snippets/containerd-1.x.toml"))
        .args(["config", "dump"])
        .output()
    else {
        panic!("containerd not found: install it (hack/deps --test does)");
    };
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "containerd config dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dump.contains("[proxy_plugins.cowsnap]"), "{dump}");
    assert!(dump.contains("snapshotter = \"cowsnap\""), "{dump}");
}

#[test]
fn daemon_with_the_shipped_config_notifies_systemd_when_ready_and_stopping() {
    let fs = LoopBtrfs::new().expect("loop btrfs");
    let notify = fs.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).expect("binding the notify socket");
    listener
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let socket = fs.path().join("cowsnap.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cowsnap"))
        .arg("serve")
        .arg("--config")
        .arg(deploy("config.toml"))
        .arg("--root")
        .arg(fs.path().join("root"))
        .arg("--address")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cowsnap");
    let mut buf = [0u8; 256];
    let ready = listener
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let ready_ok = ready.as_deref().ok() == Some("READY=1");
    // READY must mean "serving": the socket accepts connections now.
    let serving = std::os::unix::net::UnixStream::connect(&socket).is_ok();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stopping = listener
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = child
        .stderr
        .take()
        .map(|mut e| {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
            s
        })
        .unwrap_or_default();
    assert!(
        ready_ok,
        "first notification {ready:?}, want READY=1\n{log}"
    );
    assert!(serving, "socket not accepting when READY=1 was sent\n{log}");
    assert_eq!(
        stopping.as_deref().ok(),
        Some("STOPPING=1"),
        "notification on SIGTERM right after READY=1 (exit status {status:?})\n{log}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}\n{log}"
    );
}
