// Package conformance runs containerd's snapshotter conformance suite
// (github.com/containerd/containerd/snapshots/testsuite, containerd 1.6)
// against the cowsnap daemon, talking to it the way containerd does: over
// gRPC (containerd.services.snapshots.v1.Snapshots) through containerd's
// proxy snapshotter.
//
// For every case of the suite (each runs in parallel, in a fresh temp dir)
// the factory starts one `$COWSNAP_BIN serve --root <dir>/root --address
// <dir>/s.sock`, waits for the socket to accept, and hands the suite a proxy
// client. The case's cleanup closes the client, sends SIGTERM and requires
// the daemon to exit with status 0 within stopTimeout. Each daemon's stderr
// is kept in its own log file; when anything fails, all of them are printed
// (each case logs which root and log file its daemon used).
//
// The suite mounts what the daemon returns and chowns files, so it must run
// as root; TMPDIR should be on btrfs (else every daemon makes its own
// loop-backed image). The easy way is
//
//	hack/conformance.sh [path/to/cowsnap]
//
// which installs the Go dependencies from Debian, mounts a scratch btrfs and
// builds this package in GOPATH mode. By hand: copy this directory to
// $G/src/cowsnap/conformance, cd there, and with TMPDIR on btrfs run
//
//	GO111MODULE=off GOPATH=$G:/usr/share/gocode COWSNAP_BIN=/abs/cowsnap \
//	    go test -v -parallel 4 -timeout 30m
//
// The suite's cases call t.Parallel(), so -parallel (default GOMAXPROCS)
// sets how many daemons run at once.
//
// Optional: COWSNAP_LOG_DIR keeps the daemon logs there instead of in a
// temp dir that is removed afterwards. COWSNAP_ZFS_PARENT (an existing
// dataset) runs every daemon on the ZFS backend instead, each with its own
// dataset <parent>/c<n> (hack/conformance.sh with CONFORMANCE_ZPOOL sets
// it up and destroys it afterwards).
package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

const (
	snapshotterName = "cowsnap"
	startTimeout    = 30 * time.Second // until the socket accepts
	stopTimeout     = 30 * time.Second // from SIGTERM to exit, then SIGKILL
	maxSocketPath   = 108              // sizeof(sockaddr_un.sun_path) on Linux
)

func TestCowsnap(t *testing.T) {
	bin := os.Getenv("COWSNAP_BIN")
	if bin == "" {
		t.Fatal("COWSNAP_BIN is not set: point it at the cowsnap binary to test")
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("COWSNAP_BIN: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Fatal("the snapshotter suite mounts and chowns: run it as root")
	}
	logDir := os.Getenv("COWSNAP_LOG_DIR")
	if logDir == "" {
		logDir = t.TempDir()
	} else if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}

	h := &harness{bin: bin, logDir: logDir, zfsParent: os.Getenv("COWSNAP_ZFS_PARENT")}
	// Parallel subtests finish before the parent's cleanups run, and a failing
	// subtest marks the parent failed, so this sees the final verdict.
	t.Cleanup(func() {
		if t.Failed() {
			h.dumpLogs(t)
		}
	})
	testsuite.SnapshotterSuite(t, snapshotterName, h.start)
}

type harness struct {
	bin, logDir string
	zfsParent   string       // ZFS backend when set
	cases       atomic.Int64 // numbers the cases' datasets

	mu      sync.Mutex
	daemons []daemonLog
}

type daemonLog struct{ root, path string }

// start is the suite's factory: one daemon per test case.
func (h *harness) start(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(filepath.Dir(root), "s.sock")
	if len(sock) >= maxSocketPath {
		return nil, nil, fmt.Errorf("socket path %s is too long for a unix socket: use a shorter TMPDIR", sock)
	}
	logFile, err := os.CreateTemp(h.logDir, "cowsnap-*.log")
	if err != nil {
		return nil, nil, err
	}
	h.mu.Lock()
	h.daemons = append(h.daemons, daemonLog{root: root, path: logFile.Name()})
	h.mu.Unlock()

	args := []string{"serve", "--root", root, "--address", sock}
	if h.zfsParent != "" {
		dataset := fmt.Sprintf("%s/c%d", h.zfsParent, h.cases.Add(1))
		config := filepath.Join(filepath.Dir(root), "cowsnap.toml")
		text := fmt.Sprintf("backend = \"zfs\"\n[zfs]\ndataset = %q\n", dataset)
		if err := os.WriteFile(config, []byte(text), 0o644); err != nil {
			logFile.Close()
			return nil, nil, err
		}
		args = append(args, "--config", config)
	}
	cmd := exec.Command(h.bin, args...)
	cmd.Env = append(os.Environ(), "NO_COLOR=1") // plain text logs
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Don't outlive the test binary if it dies (e.g. on -timeout).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, fmt.Errorf("start %s: %w", h.bin, err)
	}
	log.G(ctx).Infof("cowsnap pid %d: root %s, socket %s, log %s", cmd.Process.Pid, root, sock, logFile.Name())

	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		logFile.Close()
		close(exited)
	}()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(stopTimeout):
			_ = cmd.Process.Kill()
			<-exited
			return fmt.Errorf("cowsnap did not exit within %v of SIGTERM; killed\n%s", stopTimeout, tail(logFile.Name()))
		}
		if waitErr != nil {
			return fmt.Errorf("cowsnap exited uncleanly: %v\n%s", waitErr, tail(logFile.Name()))
		}
		return nil
	}

	if err := waitForSocket(sock, exited); err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("%w\n%s", err, tail(logFile.Name()))
	}

	// Dial exactly as containerd 1.6 dials a proxy plugin (services/server):
	// a unix:// target, which also makes grpc-go send ":authority: localhost"
	// (a bare path would be sent as the authority, which h2 servers reject).
	conn, err := grpc.Dial(dialer.DialAddress(sock),
		grpc.WithInsecure(), // grpc-go 1.33 (Debian) has no credentials/insecure
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
	if err != nil {
		_ = stop()
		return nil, nil, fmt.Errorf("dial %s: %w", sock, err)
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)

	cleanup := func() error {
		connErr := conn.Close()
		if err := stop(); err != nil {
			return err
		}
		return connErr
	}
	return sn, cleanup, nil
}

// waitForSocket polls until sock accepts a connection, the daemon exits, or
// startTimeout passes.
func waitForSocket(sock string, exited <-chan struct{}) error {
	deadline := time.Now().Add(startTimeout)
	for {
		if c, err := net.DialTimeout("unix", sock, time.Second); err == nil {
			return c.Close()
		}
		select {
		case <-exited:
			return errors.New("cowsnap exited before its socket accepted connections")
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cowsnap socket %s did not accept connections within %v", sock, startTimeout)
		}
	}
}

func (h *harness) dumpLogs(t *testing.T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, d := range h.daemons {
		b, err := os.ReadFile(d.path)
		if err != nil {
			t.Logf("cowsnap log for root %s: %v", d.root, err)
			continue
		}
		t.Logf("cowsnap log for root %s (%s):\n%s", d.root, d.path, b)
	}
}

// tail returns the last few KiB of a daemon log, for error messages.
func tail(path string) string {
	const max = 4 << 10
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > max {
		b = append([]byte("...\n"), b[len(b)-max:]...)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return "(cowsnap wrote nothing to stderr)"
	}
	return "cowsnap stderr:\n" + string(b)
}
