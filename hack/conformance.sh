#!/usr/bin/env bash
# Run containerd's snapshotter conformance suite (containerd 1.6,
# snapshots/testsuite) against a cowsnap binary; see
# tests/conformance/conformance_test.go for what it checks.
#
# usage: hack/conformance.sh [COWSNAP_BINARY] [TEST_BINARY_FLAGS...]
#   COWSNAP_BINARY     default: target/debug/cowsnap in this repo (a first
#                      argument starting with - is taken as a test flag)
#   TEST_BINARY_FLAGS  passed on to the Go test binary,
#                      e.g. -test.run 'TestCowsnap/(Basic|Walk)$'
# environment:
#   CONFORMANCE_PARALLEL  cases run at once (-test.parallel), default 4
#   CONFORMANCE_TIMEOUT   whole-run limit (-test.timeout), default 30m
#   RUST_LOG              passed through to the daemons
#   CONFORMANCE_ZPOOL     run on ZFS instead: each case's daemon gets
#                         backend = "zfs" and its own dataset under
#                         <pool>/cowsnap-conformance-<pid> (destroyed at exit
#                         unless CONFORMANCE_KEEP_DATASETS is set: a scratch
#                         pool about to be destroyed anyway)
#   CONFORMANCE_BUILD_ONLY=FILE  only build the Go test binary into FILE
#   CONFORMANCE_TEST_BIN=FILE    run this prebuilt test binary (no Go, no
#                         package installs: how hack/vm-test runs it in its
#                         guest)
#
# Needs root (loop devices, mounts, chown). Installs its Debian packages if
# they are missing, builds the Go test in GOPATH mode against
# /usr/share/gocode (no Go module proxy needed), runs it on a scratch 4 GiB
# sparse btrfs loop mount, and always tears all of that down again.
# Exits with the test's status.
set -euo pipefail

log() { printf 'conformance: %s\n' "$*"; }
die() { log "error: $*" >&2; exit 2; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$repo/target/debug/cowsnap
if (($# > 0)) && [[ $1 != -* ]]; then
	bin=$1
	shift
fi
[[ $bin == /* ]] || bin=$PWD/$bin
build_only=${CONFORMANCE_BUILD_ONLY:-}
prebuilt=${CONFORMANCE_TEST_BIN:-}
zpool=${CONFORMANCE_ZPOOL:-}
if [[ -z $build_only ]]; then
	[[ -f $bin && -x $bin ]] || die "no cowsnap binary at $bin (cargo build first, or pass its path)"
	(($(id -u) == 0)) || die "must run as root (loop devices, mounts, chown)"
fi
[[ -z $prebuilt || -x $prebuilt ]] || die "CONFORMANCE_TEST_BIN=$prebuilt is not an executable"
parallel=${CONFORMANCE_PARALLEL:-4}
timeout=${CONFORMANCE_TIMEOUT:-30m}

# --- dependencies -----------------------------------------------------------
# golang-github-containerd-containerd-dev brings the suite, the proxy and the
# API; its dependencies bring grpc, gogo/protobuf, continuity, gotest.tools.
pkgs=(golang-go golang-github-containerd-containerd-dev golang-google-grpc-dev
	golang-github-containerd-continuity-dev golang-github-gotestyourself-gotest.tools-dev
	btrfs-progs mount util-linux)
missing=()
for p in "${pkgs[@]}"; do
	[[ -n $prebuilt ]] && break # nothing to build, and maybe no dpkg
	dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if ((${#missing[@]})); then
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
		apt-get update -q
		apt-get install -y -q --no-install-recommends "${missing[@]}"
	fi
fi
if [[ -z $build_only && -z $zpool ]]; then
	grep -qw btrfs /proc/filesystems || modprobe btrfs || die "kernel has no btrfs"
fi

# --- teardown (always) ------------------------------------------------------
tmp=
loopdev=
summary=
dataset=

# PIDs of processes whose command line mentions this run's temp dir: the
# cowsnap daemons (--root/--address under it) and the test binary.
our_pids() {
	local d pid
	for d in /proc/[0-9]*; do
		pid=${d#/proc/}
		[[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
		grep -qaF -- "$tmp/" "$d/cmdline" 2>/dev/null && echo "$pid"
	done
	return 0
}

# Mount points under the temp dir, deepest first.
our_mounts() {
	findmnt -rn -o TARGET | awk -v p="$tmp/" 'index($0, p) == 1 { print length($0), $0 }' |
		sort -rn | cut -d' ' -f2-
}

cleanup() {
	local rc=$? pids i m dev
	set +e
	trap - EXIT INT TERM
	if [[ -n $tmp ]]; then
		log "cleaning up $tmp"
		pids=$(our_pids)
		if [[ -n $pids ]]; then
			log "stopping leftover processes: $(echo $pids)"
			kill -TERM $pids 2>/dev/null
			for ((i = 0; i < 50; i++)); do
				pids=$(our_pids)
				[[ -z $pids ]] && break
				sleep 0.2
			done
			[[ -n $pids ]] && kill -KILL $pids 2>/dev/null && sleep 0.5
		fi
		m=$(our_mounts | grep -vxF -- "$tmp/mnt")
		[[ -n $m ]] && log "unmounting leftover mounts: $(echo $m)"
		for ((i = 0; i < 5; i++)); do
			m=$(our_mounts)
			[[ -z $m ]] && break
			while IFS= read -r m; do
				umount "$m" 2>/dev/null || umount -l "$m" || log "warning: cannot unmount $m"
			done <<<"$m"
		done
		if [[ -n $dataset && -z ${CONFORMANCE_KEEP_DATASETS:-} ]] && [[ -z $(our_mounts) ]]; then
			zfs destroy -r "$dataset" || log "warning: cannot destroy $dataset"
		fi
		# Our loop device, and any the daemon set up on files under $tmp.
		[[ -n $loopdev ]] && losetup -d "$loopdev" 2>/dev/null
		losetup -ln -O NAME,BACK-FILE | awk -v p="$tmp/" 'index($2, p) == 1 { print $1 }' |
			while read -r dev; do losetup -d "$dev" || log "warning: cannot detach $dev"; done
		if [[ -n $(our_mounts) ]]; then
			log "warning: mounts remain under $tmp; not removing it"
			((rc == 0)) && rc=1
		else
			rm -rf --one-file-system "$tmp"
		fi
	fi
	[[ -n $summary ]] && log "$summary"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

tmp=$(mktemp -d "${TMPDIR:-/tmp}/cowsnap-conformance.XXXXXX")
log "work dir $tmp"

# --- build the Go test (GOPATH mode, Debian's Go sources) -------------------
testbin=$tmp/conformance.test
if [[ -n $prebuilt ]]; then
	testbin=$prebuilt
else
	pkgdir=$tmp/gopath/src/cowsnap/conformance
	mkdir -p "$pkgdir"
	cp "$repo"/tests/conformance/*.go "$pkgdir"/
	export GOPATH="$tmp/gopath:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOPROXY=off
	export GOCACHE=${GOCACHE:-${HOME:-/root}/.cache/cowsnap-conformance/go-build}
	log "building the test with $(go version)"
	(cd "$pkgdir" && go vet . && go test -c -o "$testbin" .)
	if [[ -n $build_only ]]; then
		cp "$testbin" "$build_only"
		log "built $build_only"
		exit 0
	fi
fi

# --- scratch filesystem -----------------------------------------------------
mnt=$tmp/mnt
if [[ -n $zpool ]]; then
	# ZFS: the roots hold only metadata; the datasets go under $dataset.
	dataset=$zpool/cowsnap-conformance-$$
	zfs create -o mountpoint=none "$dataset"
	export COWSNAP_ZFS_PARENT=$dataset
	mkdir -p "$mnt"
	log "zfs scratch: datasets under $dataset"
else
	img=$tmp/btrfs.img
	truncate -s 4G "$img"
	mkfs.btrfs -q "$img" >/dev/null
	loopdev=$(losetup --find --show "$img")
	mkdir -p "$mnt"
	mount -t btrfs "$loopdev" "$mnt"
	log "btrfs scratch on $loopdev at $mnt"
fi
mkdir -p "$mnt/t" "$tmp/logs"

# --- run ----------------------------------------------------------------------
log "running the suite against $bin (parallel $parallel, timeout $timeout)"
# In the background, so that INT/TERM reach the trap at once instead of
# after the run; pipefail makes the pipeline's status the test's.
set +e
(
	cd "$tmp"
	export TMPDIR=$mnt/t COWSNAP_BIN=$bin COWSNAP_LOG_DIR=$tmp/logs
	exec "$testbin" -test.v -test.parallel "$parallel" -test.timeout "$timeout" "$@"
) 2>&1 | tee "$tmp/test.log" &
wait $!
rc=$?
set -e

count() { grep -cE "^ *--- $1: TestCowsnap/" "$tmp/test.log" || true; }
passed=$(count PASS) failed=$(count FAIL) skipped=$(count SKIP)
summary="$passed passed, $failed failed, $skipped skipped"
if ((rc != 0 && failed == 0)); then
	log "test binary exited $rc without failing a case (setup failure, panic or timeout?)"
elif ((rc == 0 && passed + failed + skipped == 0)); then
	log "error: no test case ran (check -test.run: cases are TestCowsnap/NAME)"
	rc=1
fi
exit "$rc"
