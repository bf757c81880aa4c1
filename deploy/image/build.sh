#!/usr/bin/env bash
# Build nodeproxy's image file system into OUT: the steps deploy/Dockerfile runs, as a plain
# script, so CI runs them on a machine without a container engine.
#
#   deploy/image/build.sh [--install-deps] [--profile release|dev] [--out DIR]
#
# --install-deps  install the build dependencies first (`cargo xtask setup build`; idempotent)
# --profile       cargo profile (default release; CI uses dev to reuse the test build)
# --workspace     build with the workspace's feature resolution (CI: reuses the test build
#                 instead of rebuilding ring, rustls and kube for `-p nodeproxy`)
# --out           root of the image file system (default target/image/rootfs)
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=release
out=target/image/rootfs
deps=0
select=(-p nodeproxy)
while [ $# -gt 0 ]; do
  case "$1" in
    --install-deps) deps=1 ;;
    --workspace) select=(--workspace --bins) ;;
    --profile) profile="$2"; shift ;;
    --out) out="$2"; shift ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$deps" = 1 ]; then
  cargo xtask setup build
fi

echo "build.sh: cargo build --locked ${select[*]} --profile $profile"
cargo build --locked "${select[@]}" --profile "$profile"
dir=$profile
[ "$profile" = dev ] && dir=debug
bin="target/$dir/nodeproxy"

rm -rf "$out"
install -D -m 0755 "$bin" "$out/usr/local/bin/nodeproxy"

# The runtime stage is debian:bookworm-slim: every shared library the binary links must be one
# that image has (glibc and libgcc only; the eBPF objects are embedded, TLS is rustls).
allowed=" libc.so.6 libm.so.6 libgcc_s.so.1 libdl.so.2 libpthread.so.0 librt.so.1 ld-linux-x86-64.so.2 ld-linux-aarch64.so.1 "
for lib in $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'); do
  case "$allowed" in
    *" $lib "*) ;;
    *) echo "build.sh: $bin needs $lib, which debian:bookworm-slim does not have" >&2; exit 1 ;;
  esac
done

# Smoke test of the staged binary: it runs, and knows the Kubernetes source.
"$out/usr/local/bin/nodeproxy" run --help | grep -q -- '--source <SOURCE>'
echo "build.sh: image file system in $out ($(du -sh "$out" | cut -f1))"
