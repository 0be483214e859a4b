#!/usr/bin/env bash
# Builds the eastwest container image (collector + aggregator, deploy/image/Containerfile) with
# podman, offline: every download happens before the build, which runs with --network none.
# Idempotent: each step reuses what it made last time when its inputs did not change.
# `scripts/build-image.sh --help` explains the steps, the options and the cache.
set -euo pipefail
HERE=$PWD   # file names given as options are relative to where the script was started
cd "$(dirname "$0")/.."
REPO=$PWD

say()  { printf 'eastwest image: %s\n' "$*"; }
step() { printf '\neastwest image: [%s/6] %s\n' "$1" "$2"; }
die()  { printf 'eastwest image: error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<'EOF'
Usage: scripts/build-image.sh [options]

Builds ONE image holding the collector and the aggregator (deploy/image/Containerfile) and tags
it ghcr.io/eastwest/eastwest:<version in pyproject.toml> (the tag deploy/kubernetes names) and
localhost/eastwest:dev. No image registry is needed: the base is made from Debian packages.

Steps (each skipped when its result is current; the cache is described below):
  1. base      a root filesystem from Debian bookworm packages made by mmdebstrap (python3,
               python3-venv, ca-certificates, python3-bpfcc), imported as
               localhost/eastwest-base:bookworm-<digest of the recipe>. ~1 min and ~400 MB
               (mostly LLVM, which bcc compiles the probes with); made once, then reused.
  2. wheels    every Python dependency in pyproject.toml as a wheel (`pip wheel` with $PYTHON,
               which must be Python 3.11 like Debian 12's python3), redone when the
               dependencies change
  3. sources   the eastwest, collector and aggregator packages as they are in this checkout
               (tracked and untracked files, minus what .gitignore ignores)
  4. native    the C helpers (VXLAN decoder, wire batch decoder, correlator) compiled with this
               machine's compiler; without one the image uses the slower pure-Python paths
  5. web       the dashboard, built by scripts/setup-web.sh (Node.js 20+ and npm, packages
               from the npm registry) and copied in; --no-web leaves it out
  6. build     podman build --runtime runc --network none; podman reuses unchanged layers

Options:
  --save FILE        also write the image to FILE (an archive to load into a cluster's runtime)
  --format FMT       archive format for --save: oci-archive (default) or docker-archive
  --no-web           build without the dashboard (the aggregator's / then says it is not built)
  --rebuild-base     make the base again (e.g. to take Debian security updates)
  --mirror SRC       Debian mirror for the base: a URL, or an apt sources file (default: this
                     machine's /etc/apt/sources.list.d/debian.sources when it names bookworm,
                     else http://deb.debian.org/debian)
  --cache DIR        cache folder (default build/image in this checkout; $EASTWEST_IMAGE_CACHE)
  -h, --help         this text

Environment: PYTHON (default .venv/bin/python): the Python 3.11 that builds wheels and helpers.

Needs: root, podman, mmdebstrap and runc (bash scripts/setup-system.sh installs them), network
access to a Debian mirror and PyPI (steps 1-2) and npm (step 5). The cache: the base is an
image in podman's storage; wheels, sources, helpers and dashboard are in the cache folder,
which is the build context. A second run with nothing changed takes seconds.

Examples:
  scripts/build-image.sh                                  # build and tag
  scripts/build-image.sh --save eastwest.tar              # also an OCI archive
  kind load image-archive eastwest.tar                    # kind
  ctr -n k8s.io images import eastwest.tar                # containerd (k3s: k3s ctr ...)
  podman run --rm --runtime runc --network none localhost/eastwest:dev --version
  # (hosts whose hard open-files limit is below podman's default: add
  #  --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 to podman run)
EOF
}

SAVE="" FORMAT=oci-archive WEB=1 REBUILD_BASE=0 MIRROR=""
CACHE=${EASTWEST_IMAGE_CACHE:-$REPO/build/image}
while [ $# -gt 0 ]; do
  case "$1" in
    --save) [ $# -ge 2 ] || die "--save needs a file name"; SAVE=$2; shift 2 ;;
    --format) [ $# -ge 2 ] || die "--format needs oci-archive or docker-archive"; FORMAT=$2; shift 2 ;;
    --no-web) WEB=0; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL or a sources file"; MIRROR=$2; shift 2 ;;
    --cache) [ $# -ge 2 ] || die "--cache needs a folder"; CACHE=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
case "$FORMAT" in oci-archive|docker-archive) ;; *)
  die "--format '$FORMAT': use oci-archive or docker-archive" ;; esac
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$HERE" "$1" ;; esac; }
[ -z "$SAVE" ] || SAVE=$(absolute "$SAVE")
CACHE=$(absolute "$CACHE")
[ -z "$MIRROR" ] || [ ! -e "$HERE/$MIRROR" ] || MIRROR=$(absolute "$MIRROR")

# --- what the build needs from this machine ---------------------------------------------------
[ "$(id -u)" = 0 ] || die "must run as root (mmdebstrap and podman's storage in /var/lib/containers)"
for tool in podman mmdebstrap runc; do
  command -v "$tool" >/dev/null 2>&1 \
    || die "$tool is missing: run 'bash scripts/setup-system.sh' (installs podman, mmdebstrap, runc)"
done
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v "$PY" || true)
[ -n "$PY" ] && [ -x "$PY" ] || die "no Python at '${PYTHON:-.venv/bin/python}': run 'bash scripts/setup-venv.sh' or set PYTHON"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || die "$PY is Python $("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])'), the image's (Debian 12) is 3.11: set PYTHON to a Python 3.11"
VERSION=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=ghcr.io/eastwest/eastwest:$VERSION
DEV=localhost/eastwest:dev

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
CTX=$CACHE/context
mkdir -p "$CTX"
# one build at a time per cache (a second waits)
exec 9>"$CACHE/.lock"
flock 9
say "eastwest $VERSION -> $IMAGE, $DEV (cache $CACHE)"

digest() { sha256sum | cut -c1-12; }

# --- 1. base ---------------------------------------------------------------------------------
step 1 "base root filesystem (Debian bookworm, mmdebstrap)"
SUITE=bookworm
BASE_PKGS=python3,python3-venv,python3-bpfcc,ca-certificates
MM_ARGS=(--variant=essential --include="$BASE_PKGS"
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright')
BASE=localhost/eastwest-base:$SUITE-$(printf '%s\n' "$SUITE" "${MM_ARGS[@]}" | digest)
if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE"; then
  if [ -z "$MIRROR" ]; then
    src=/etc/apt/sources.list.d/debian.sources
    if [ -f "$src" ] && grep -qw "$SUITE" "$src"; then MIRROR=$src; else MIRROR=http://deb.debian.org/debian; fi
  fi
  say "making $BASE from $MIRROR (about a minute)"
  rm -f "$CACHE/base.tar"
  mmdebstrap --quiet "${MM_ARGS[@]}" "$SUITE" "$CACHE/base.tar" "$MIRROR" \
    || die "mmdebstrap failed (is the Debian mirror '$MIRROR' reachable?)"
  podman import --quiet --message "eastwest base: mmdebstrap $SUITE $BASE_PKGS" \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' "$CACHE/base.tar" "$BASE" >/dev/null
  rm -f "$CACHE/base.tar"
  say "base $BASE imported"
else
  say "base $BASE present (--rebuild-base makes it again)"
fi

# --- 2. wheels -------------------------------------------------------------------------------
step 2 "Python dependencies as wheels"
REQ=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
BUILD_REQ=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
want=$(printf '%s\n' "$REQ" "--" "$BUILD_REQ" "$("$PY" -c 'import sys, sysconfig; print(sys.version_info[:2], sysconfig.get_platform())')" | digest)
if [ -f "$CTX/wheels/.stamp" ] && [ "$(cat "$CTX/wheels/.stamp")" = "$want" ]; then
  say "wheels up to date ($(ls "$CTX/wheels"/*.whl | wc -l) in $CTX/wheels)"
else
  say "fetching and building wheels with $PY (PyPI)"
  rm -rf "$CTX/wheels.tmp"
  mkdir -p "$CTX/wheels.tmp"
  printf '%s\n' "$REQ" > "$CTX/wheels.tmp/requirements.txt"
  printf '%s\n' "$BUILD_REQ" > "$CTX/wheels.tmp/build-requirements.txt"
  "$PY" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$CTX/wheels.tmp" \
      --requirement "$CTX/wheels.tmp/requirements.txt" \
      --requirement "$CTX/wheels.tmp/build-requirements.txt" \
    || die "pip wheel failed (is PyPI reachable?)"
  echo "$want" > "$CTX/wheels.tmp/.stamp"
  rm -rf "$CTX/wheels"
  mv "$CTX/wheels.tmp" "$CTX/wheels"
  say "$(ls "$CTX/wheels"/*.whl | wc -l) wheels in $CTX/wheels"
fi
DEPS=$(cd "$CTX/wheels" && ls -l --time-style=+ ./*.whl requirements.txt | awk '{print $5, $NF}' | digest)

# --- 3. sources ------------------------------------------------------------------------------
step 3 "sources (eastwest, collector, aggregator)"
rm -rf "$CTX/src"
mkdir -p "$CTX/src"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard -- \
      pyproject.toml README.md eastwest collector aggregator \
    | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
    | tar --null --files-from=- -cf - | tar -xf - -C "$CTX/src"
else
  tar --exclude=__pycache__ -cf - pyproject.toml README.md eastwest collector aggregator \
    | tar -xf - -C "$CTX/src"
fi
SRC=$(tar -C "$CTX/src" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - . | digest)
say "$(find "$CTX/src" -type f | wc -l) files, digest $SRC"

# --- 4. native helpers -----------------------------------------------------------------------
step 4 "C helpers (ctypes libraries)"
mkdir -p "$CTX/native"
for spec in ewvxlan:collector.vxlan.native_build ewwire:aggregator.store.wire_columns \
            ewcorrelate:aggregator.correlate_columns; do
  # each build is skipped when the library's compiled-in digest matches its sources
  "$PY" -m "${spec#*:}" --quiet --output "$CTX/native/lib${spec%%:*}.so"
done
say "$(ls "$CTX/native" | tr '\n' ' ')"

# --- 5. dashboard ----------------------------------------------------------------------------
step 5 "dashboard (web/dist)"
rm -rf "$CTX/web"
mkdir -p "$CTX/web"
if [ "$WEB" = 1 ]; then
  bash scripts/setup-web.sh || die "the dashboard did not build (or use --no-web)"
  cp -a web/dist/. "$CTX/web/"
  say "dashboard copied ($(du -sh "$CTX/web" | cut -f1))"
else
  say "left out (--no-web)"
fi

# --- 6. build --------------------------------------------------------------------------------
step 6 "podman build (--network none)"
podman build --runtime runc --network none --pull=never --layers \
  --file deploy/image/Containerfile \
  --build-arg BASE="$BASE" --build-arg VERSION="$VERSION" \
  --build-arg DEPS="$DEPS" --build-arg SRC="$SRC" \
  --tag "$IMAGE" --tag "$DEV" "$CTX" \
  2>&1 | sed -u 's/^/  /' || die "podman build failed (its output is above)"
id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
say "built $IMAGE and $DEV (${id:0:12}, $((size / 1000000)) MB)"

if [ -n "$SAVE" ]; then
  rm -f "$SAVE"
  podman save --quiet --format "$FORMAT" --output "$SAVE" "$IMAGE" || die "podman save to $SAVE failed"
  say "saved $SAVE ($FORMAT, $(du -h "$SAVE" | cut -f1))"
fi
