#!/usr/bin/env bash
# Installs what eastwest needs from the machine itself: Debian packages, kernel headers for bcc,
# and the tracefs / debugfs / bpffs mounts. Idempotent: a second run checks and says so quickly.
# Why each piece is there: the comments below, README.md (the first lines) and docs/collector.md
# ("Socket probes": the kernel features the collector needs, what it does without them).
set -euo pipefail

say() { printf 'eastwest setup: %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
  say "must run as root (eBPF, network namespaces and apt need it)"; exit 1
fi

# Debian packages. Grouped by what needs them; all are installed because CI runs every layer.
PKGS=(
  # eBPF: bcc's Python bindings and tools (tcplife-bpfcc is a benchmark peer), bpftool for BTF
  python3-bpfcc bpfcc-tools bpftool
  # the lab and the collector's capture: namespaces, veth, bridges, VXLAN, packet drops
  iproute2 iptables tcpdump
  # peers and cross-checks for the VXLAN decoder and benchmarks
  tshark softflowd tcpreplay
  # a C compiler for the bulk VXLAN path's helper (collector/vxlan/ewvxlan*.c, setup-venv.sh);
  # GNU time for the benchmarks' peak memory of a child (bench/bench_vxlan.py)
  gcc libc6-dev time
  # real servers for the scale-out and export tests
  nats-server prometheus clickhouse-server clickhouse-client
  # ClickHouse replication's coordination service (tests: 2 shards x 2 replicas)
  zookeeper
  # the dashboard's browser tests
  chromium chromium-driver
  # the docs' zsh completion example, run as written by tests/docs
  zsh
  # the container image (scripts/build-image.sh, tests/image): a base root filesystem from
  # Debian packages, then podman builds on it; runc because crun refuses hybrid-cgroup hosts
  mmdebstrap podman runc
)
# ${EASTWEST_EXTRA_PKGS} lets a later issue add packages without editing this list by hand.
read -r -a EXTRA <<<"${EASTWEST_EXTRA_PKGS:-}"
PKGS+=("${EXTRA[@]}")

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  # tshark asks whether non-root users may capture; answer once, non-interactively
  echo 'wireshark-common wireshark-common/install-setuid boolean false' | debconf-set-selections
  # the lock timeout: another apt run on the machine (unattended upgrades, a second setup) waits
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# Kernel headers for bcc. Exact ones where Debian has them; otherwise link the nearest Debian
# headers. Those are fine for tracepoint programs and WRONG for kernel struct layouts, which is
# why every struct offset the probes use comes from the running kernel's BTF instead.
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build" ]; then
  if apt-get -o DPkg::Lock::Timeout=900 install -y -qq "linux-headers-$K" >/dev/null 2>&1; then
    say "installed linux-headers-$K"
  else
    arch=$(dpkg --print-architecture)
    dpkg-query -W -f='${Status}' "linux-headers-$arch" 2>/dev/null | grep -q 'install ok installed' \
      || { apt-get -o DPkg::Lock::Timeout=900 update -qq
           apt-get -o DPkg::Lock::Timeout=900 install -y -qq "linux-headers-$arch" >/dev/null; }
    H=$(ls -d /usr/src/linux-headers-*-"$arch" | sort -V | tail -n1)
    mkdir -p "/lib/modules/$K"
    ln -sfn "$H" "/lib/modules/$K/build"
    ln -sfn "${H%-"$arch"}-common" "/lib/modules/$K/source"
    say "no headers for $K in Debian: linked $H (structs come from BTF, never from these)"
  fi
else
  say "kernel headers present for $K"
fi

mountpoint -q /sys/kernel/debug   || mount -t debugfs none /sys/kernel/debug
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/fs/bpf         || mount -t bpf bpf /sys/fs/bpf
say "tracefs, debugfs and bpffs mounted"
