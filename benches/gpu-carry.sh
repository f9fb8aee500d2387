#!/usr/bin/env bash
# Packs what benches/gpu.sh --from-carry needs on the device machine (which has no cargo): the release
# binaries desam, desam-train, gpu_bench and libdesam.so, stripped, as .gpu-carry/bin.tar.xz (git-ignored
# through .git/info/exclude). The working tree (models/default included) travels anyway; the tree plus
# this archive must stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
source benches/lib.sh
cargo build --release --lib --bin desam --bin desam-train --example gpu_bench
ex=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$ex")"
grep -qx '/.gpu-carry/' "$ex" 2>/dev/null || echo '/.gpu-carry/' >> "$ex"
rm -rf .gpu-carry && mkdir -p .gpu-carry/stage
cp target/release/desam target/release/desam-train target/release/examples/gpu_bench target/release/libdesam.so .gpu-carry/stage/
strip --strip-unneeded .gpu-carry/stage/*
tar -cJf .gpu-carry/bin.tar.xz -C .gpu-carry/stage .
rm -rf .gpu-carry/stage
du -h .gpu-carry/bin.tar.xz
