#!/usr/bin/env bash
# Builds the installable artefacts into dist/ (docs/install.md): the Debian packages `desam` (CLIs,
# private CPU libtorch, default model) and `orthanc-desam` (the plugin + /etc/orthanc/desam.json),
# the relocatable tarball desam-VERSION-linux-x86_64.tar.gz, and with --cuda the `desam-cuda` add-on.
#
# Usage: bash scripts/package.sh [--cuda] [--profile release|dev] [--out DIR]
#   --profile dev reuses the dev build (tests/package.rs does: same code and features, then stripped);
#   the default builds release. Shipped ELF files get a RUNPATH relative to $ORIGIN (patchelf) and the
#   CUDA wheel's libtorch_cpu.so loses its CUDA-profiler requirements (scripts/elf-drop-needed.py).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_CUDA=0
PROFILE=release
OUT=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) WITH_CUDA=1 ;;
    --profile) PROFILE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "package.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
for tool in patchelf dpkg-deb readelf strip objdump nm cc python3; do
  command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (bash scripts/setup.sh installs it)" >&2; exit 1; }
done

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
ARCH=amd64
TORCH=.venv/lib/python3.11/site-packages/torch
NVIDIA=.venv/lib/python3.11/site-packages/nvidia
[ -f "$TORCH/lib/libtorch_cpu.so" ] || { echo "package.sh: no libtorch in $TORCH (run scripts/setup.sh)" >&2; exit 1; }
TORCH_VERSION=$(sed -n 's/^Version: //p' .venv/lib/python3.11/site-packages/torch-*.dist-info/METADATA | head -1)

started=$(date +%s)
case "$PROFILE" in
  release) cargo build --release --bins --lib; BUILD=target/release ;;
  dev) cargo build --bins --lib; BUILD=target/debug ;;
  *) echo "package.sh: --profile is release or dev" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGE="$OUT/stage"
rm -rf "$STAGE"
mkdir -p "$STAGE"

# One shipped ELF: copied, stripped of debug info, RUNPATH set relative to where it is installed.
ship_elf() { # SRC DEST RUNPATH
  install -m 0755 "$1" "$2"
  strip --strip-debug "$2"
  patchelf --set-rpath "$3" "$2"
}

# ---- desam: /usr/bin, /usr/lib/desam (private CPU libtorch), /usr/share/desam/models/default
D="$STAGE/desam"
mkdir -p "$D/DEBIAN" "$D/usr/bin" "$D/usr/lib/desam" "$D/usr/share/desam/models" "$D/usr/share/doc/desam/help"
for bin in desam desam-train; do
  ship_elf "$BUILD/$bin" "$D/usr/bin/$bin" '$ORIGIN/../lib/desam'
done
# libtorch_cpu needs libc10 and libgomp (and the C/C++ runtime from the system), nothing else once
# its CUDA-profiler requirements are dropped; libtorch.so is not needed (it only pulls in CUDA).
for lib in libtorch_cpu.so libc10.so libgomp.so.1; do
  install -m 0644 "$TORCH/lib/$lib" "$D/usr/lib/desam/$lib"
  patchelf --set-rpath '$ORIGIN' "$D/usr/lib/desam/$lib"
done
# The wheel's libtorch_cpu needs libcudart and libcupti for its profiler's CUDA hooks only. They are
# replaced by libdesam_nocuda.so: our stubs of exactly the functions it imports from them, answering
# "no CUDA" (a host loading plugins with RTLD_NOW, as Orthanc does, needs every symbol resolved).
# The stubs carry their own symbol version, so libtorch_cuda's versioned references (desam-cuda)
# still bind to NVIDIA's real libraries; libtorch_cpu's profiler hooks keep the stubs.
cuda_imports=$(nm -D --undefined-only "$TORCH/lib/libtorch_cpu.so" | awk '$2 ~ /@libcu(dart|pti)\.so/ {sub(/@.*/, "", $2); print $2}')
python3 scripts/nocuda-stubs.py $cuda_imports > "$STAGE/nocuda.c"
printf 'DESAM_NOCUDA_1 { global: *; };\n' > "$STAGE/nocuda.map"
cc -shared -fPIC -O2 -o "$D/usr/lib/desam/libdesam_nocuda.so" -Wl,-soname,libdesam_nocuda.so -Wl,-rpath,'$ORIGIN' \
  -Wl,--version-script="$STAGE/nocuda.map" "$STAGE/nocuda.c"
chmod 0644 "$D/usr/lib/desam/libdesam_nocuda.so"
patchelf --replace-needed libcudart.so.13 libdesam_nocuda.so --remove-needed libcupti.so.13 "$D/usr/lib/desam/libtorch_cpu.so"
# (--replace-needed also renamed the version requirement to the stub library: drop it by either name.)
python3 scripts/elf-drop-needed.py "$D/usr/lib/desam/libtorch_cpu.so" libcudart.so.13 libcupti.so.13 libdesam_nocuda.so
cp -r models/default "$D/usr/share/desam/models/default"
chmod -R u=rwX,go=rX "$D/usr/share/desam"
install -m 0644 packaging/copyright.desam "$D/usr/share/doc/desam/copyright"
install -m 0644 "$(ls -d .venv/lib/python3.11/site-packages/torch-*.dist-info)/licenses/LICENSE" \
  "$D/usr/share/doc/desam/LICENSE.libtorch"
# --help of every command, as installed (the CLIs document themselves; no separate man pages).
help_of() { env -i "$D/usr/bin/$1" "${@:2}" --help; }
help_of desam > "$D/usr/share/doc/desam/help/desam.txt"
for sub in segment phantom forward model demo; do help_of desam "$sub" > "$D/usr/share/doc/desam/help/desam-$sub.txt"; done
help_of desam-train > "$D/usr/share/doc/desam/help/desam-train.txt"

# glibc: the newest symbol version any shipped ELF asks for.
glibc_min=$(find "$D/usr" -type f \( -name '*.so*' -o -perm -u+x \) -exec objdump -T {} + 2>/dev/null \
  | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)

installed_kb() { du -sk --exclude=DEBIAN "$1" | cut -f1; }
cat > "$D/DEBIAN/control" <<EOF
Package: desam
Version: $VERSION
Architecture: $ARCH
Maintainer: desam authors <desam@localhost>
Installed-Size: $(installed_kb "$D")
Depends: libc6 (>= $glibc_min), libstdc++6 (>= 12), libgcc-s1
Suggests: orthanc-desam, desam-cuda
Section: science
Priority: optional
Homepage: https://github.com/desam/desam
Description: fully automatic prostate MR segmentation (DeSAM) - command line
 desam segments the prostate on T2-weighted MR without a prompt (DeSAM on LiteMedSAM) and writes
 DICOM-SEG or NIfTI masks; desam-train trains and evaluates models. Ships a private CPU build of
 libtorch $TORCH_VERSION under /usr/lib/desam and the default model under
 /usr/share/desam/models/default. Install desam-cuda for NVIDIA GPUs. Not for clinical use.
EOF

# ---- orthanc-desam: the plugin in Debian's plugin folder, its configuration as a conffile.
P="$STAGE/orthanc-desam"
mkdir -p "$P/DEBIAN" "$P/usr/share/orthanc/plugins" "$P/etc/orthanc" "$P/usr/share/doc/orthanc-desam"
ship_elf "$BUILD/libdesam.so" "$P/usr/share/orthanc/plugins/libdesam.so" '$ORIGIN/../../../lib/desam'
chmod 0644 "$P/usr/share/orthanc/plugins/libdesam.so"
# Enabled, model /usr/share/desam/models/default, only the "DeSAM" section (Orthanc refuses a section
# that two of its configuration files define).
install -m 0644 plugin-manifest/orthanc/desam.json "$P/etc/orthanc/desam.json"
install -m 0644 packaging/copyright.orthanc-desam "$P/usr/share/doc/orthanc-desam/copyright"
echo /etc/orthanc/desam.json > "$P/DEBIAN/conffiles"
install -m 0755 packaging/postinst.orthanc-desam "$P/DEBIAN/postinst"
cat > "$P/DEBIAN/control" <<EOF
Package: orthanc-desam
Version: $VERSION
Architecture: $ARCH
Maintainer: desam authors <desam@localhost>
Installed-Size: $(installed_kb "$P")
Depends: orthanc (>= 1.10.1), desam (= $VERSION)
Section: science
Priority: optional
Homepage: https://github.com/desam/desam
Description: fully automatic prostate MR segmentation (DeSAM) - Orthanc plugin
 Segments every stable prostate T2 MR series Orthanc receives and stores a DICOM-SEG back, exactly
 once. Configuration: /etc/orthanc/desam.json. Restart Orthanc after installing. Not for clinical use.
EOF

# ---- desam-cuda (--cuda): libtorch's CUDA part and the NVIDIA runtime it loads, beside libtorch_cpu.
if [ "$WITH_CUDA" -eq 1 ]; then
  C="$STAGE/desam-cuda"
  mkdir -p "$C/DEBIAN" "$C/usr/lib/desam" "$C/usr/share/doc/desam-cuda/nvidia-licenses"
  # libtorch_cuda's link closure inside the wheels, plus what CUDA libraries dlopen by name (cuDNN's
  # engine libraries, NVRTC's builtins); never the base package's libtorch_cpu, libc10, libgomp.
  {
    for lib in libtorch_cuda.so libc10_cuda.so libtorch_cuda_linalg.so; do
      echo "$TORCH/lib/$lib"
      ldd "$TORCH/lib/$lib" | awk '$3 ~ /site-packages/ {print $3}'
    done
    ls "$NVIDIA"/cudnn/lib/libcudnn*.so.* "$NVIDIA"/cu13/lib/libnvrtc-builtins*.so.* "$NVIDIA"/cu13/lib/libcupti.so.* 2>/dev/null
  } | while read -r f; do realpath "$f"; done | sort -u \
    | grep -vE '/(libtorch_cpu\.so|libc10\.so|libgomp\.so\.1)$' > "$STAGE/cuda-files.txt"
  while read -r f; do
    install -m 0644 "$f" "$C/usr/lib/desam/$(basename "$f")"
    patchelf --set-rpath '$ORIGIN' "$C/usr/lib/desam/$(basename "$f")"
  done < "$STAGE/cuda-files.txt"
  install -m 0644 packaging/copyright.desam-cuda "$C/usr/share/doc/desam-cuda/copyright"
  for lic in .venv/lib/python3.11/site-packages/nvidia_*.dist-info/licenses/*; do
    install -m 0644 "$lic" "$C/usr/share/doc/desam-cuda/nvidia-licenses/$(basename "$(dirname "$(dirname "$lic")")")-$(basename "$lic")"
  done
  cat > "$C/DEBIAN/control" <<EOF
Package: desam-cuda
Version: $VERSION
Architecture: $ARCH
Maintainer: desam authors <desam@localhost>
Installed-Size: $(installed_kb "$C")
Depends: desam (= $VERSION)
Section: non-free/science
Priority: optional
Description: fully automatic prostate MR segmentation (DeSAM) - NVIDIA CUDA add-on
 libtorch $TORCH_VERSION's CUDA part and the NVIDIA CUDA runtime libraries it needs, for desam and
 orthanc-desam: with it, --device cuda and the plugin's "Device": "auto" use an NVIDIA GPU without
 rebuilding anything. Needs the NVIDIA driver. Contains non-free NVIDIA libraries.
EOF
fi

# ---- build the .deb files and the tarball
sizes="$OUT/sizes.txt"
: > "$sizes"
for pkg in desam orthanc-desam $([ "$WITH_CUDA" -eq 1 ] && echo desam-cuda); do
  level=9; [ "$pkg" = desam-cuda ] && level=3 # several GB: fast compression
  deb="$OUT/${pkg}_${VERSION}_${ARCH}.deb"
  dpkg-deb --root-owner-group -Zzstd -z"$level" --build "$STAGE/$pkg" "$deb" >/dev/null
  printf '%-45s %6s MB packed, %6s MB installed\n' "$(basename "$deb")" \
    "$(( $(stat -c %s "$deb") / 1048576 ))" "$(( $(installed_kb "$STAGE/$pkg") / 1024 ))" >> "$sizes"
done
# The tarball is the desam package's /usr tree: bin/, lib/desam/, share/desam/models/default, so the
# same $ORIGIN RUNPATH and the ../share/desam/models/default model lookup work wherever it is unpacked.
TARNAME="desam-$VERSION-linux-x86_64"
rm -rf "${STAGE:?}/$TARNAME"
cp -a "$D/usr" "$STAGE/$TARNAME"
tar -C "$STAGE" --owner=0 --group=0 -czf "$OUT/$TARNAME.tar.gz" "$TARNAME"
rm -rf "${STAGE:?}/$TARNAME"
printf '%-45s %6s MB packed, %6s MB unpacked\n' "$TARNAME.tar.gz" \
  "$(( $(stat -c %s "$OUT/$TARNAME.tar.gz") / 1048576 ))" "$(( $(installed_kb "$D/usr") / 1024 ))" >> "$sizes"
cat "$sizes"
echo "package.sh: done in $(( $(date +%s) - started )) s; artefacts in $OUT (staging trees in $OUT/stage)"
