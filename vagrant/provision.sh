#!/usr/bin/env bash
# Provisions the Vagrant box for cowsnap's tests (run as root by Vagrant;
# idempotent): Debian's contrib component for zfs-dkms, the headers of the
# running kernel, OpenZFS, btrfs-progs, build tools and Rust. The Go,
# containerd and runc packages the tests need are installed by hack/deps
# and hack/conformance.sh themselves, as in CI.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

# contrib: this VM's own sources, nothing else uses them.
if [[ -f /etc/apt/sources.list ]]; then
	sed -i -E '/^deb(-src)?[[:space:]].*[[:space:]]main([[:space:]]|$)/ { / contrib( |$)/! s/$/ contrib/ }' \
		/etc/apt/sources.list
fi
for f in /etc/apt/sources.list.d/*.sources; do
	[[ -f $f ]] && sed -i -E '/^Components:/ { / contrib( |$)/! s/$/ contrib/ }' "$f"
done
apt-get update -q

kernel=$(uname -r)
if ! apt-get install -y -q --no-install-recommends "linux-headers-$kernel"; then
	# The box is older than the archive: take the current kernel; zfs-dkms
	# builds for it, and it runs after one reboot.
	apt-get install -y -q linux-image-amd64 linux-headers-amd64
fi
apt-get install -y -q --no-install-recommends \
	zfs-dkms zfsutils-linux btrfs-progs build-essential pkg-config curl ca-certificates jq git

if ! modprobe zfs 2>/dev/null; then
	echo "provision: the zfs module is not built for the running kernel $kernel;" \
		"run 'vagrant reload --provision-with setup' once to boot the new kernel" >&2
	exit 1
fi
zfs version

# Rust (cowsnap needs >= 1.90), for root: the tests run as root.
if [[ ! -x /root/.cargo/bin/cargo ]]; then
	curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
		sh -s -- -y --profile minimal --component clippy,rustfmt
fi
/root/.cargo/bin/cargo --version
echo "provision: ready; run: vagrant provision --provision-with tests"
