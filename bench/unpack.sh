#!/usr/bin/env bash
# Unpacking one image layer: castiron's safe unpacker vs GNU tar and Python's tarfile
# (extractall with the stdlib's own "data" safety filter), side by side with hyperfine.
#
# Usage: bench/unpack.sh [FILES] [BIG_FILES]   (defaults: 10000 small files, 8 files of 16 MiB)
#
# Builds a synthetic layer (small files of 1-4 KiB in 100 directories, a few large files,
# symlinks and hard links) as tar and tar+gzip, then times, for each, an unpack into a fresh
# directory: `castiron` (castiron.images.unpack.unpack_rootfs), `tar -x` (GNU tar) and
# `tarfile` (Python's extractall(filter="data")). Prints the machine and hyperfine's table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
FILES=${1:-10000}
BIG=${2:-8}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/castiron-bench-unpack.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "machine: $(nproc) cpu, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -r)"
echo "tools: $(tar --version | head -1), $($PY --version), $(hyperfine --version)"

"$PY" - "$WORK" "$FILES" "$BIG" <<'EOF'
import gzip, io, random, shutil, sys, tarfile
work, files, big = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
with tarfile.open(f"{work}/layer.tar", "w", format=tarfile.PAX_FORMAT) as tar:
    def add(info, data=b""):
        info.mtime = 1_700_000_000
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if data else None)
    for d in range(100):
        info = tarfile.TarInfo(f"app/d{d:03}"); info.type = tarfile.DIRTYPE; info.mode = 0o755
        add(info)
    for i in range(files):
        info = tarfile.TarInfo(f"app/d{i * 100 // files:03}/f{i:06}.txt"); info.mode = 0o644
        add(info, rng.randbytes(rng.randint(1024, 4096)))
    for i in range(big):
        info = tarfile.TarInfo(f"app/big{i}.bin"); info.mode = 0o644
        add(info, rng.randbytes(16 * 1024 * 1024))
    for i in range(200):
        info = tarfile.TarInfo(f"app/links/s{i}"); info.type = tarfile.SYMTYPE
        info.linkname = f"../d{i * 100 // files:03}/f{i:06}.txt"; add(info)
        info = tarfile.TarInfo(f"app/links/h{i}"); info.type = tarfile.LNKTYPE
        info.linkname = f"app/d{i * 100 // files:03}/f{i:06}.txt"; add(info)
with open(f"{work}/layer.tar", "rb") as src, gzip.open(f"{work}/layer.tar.gz", "wb", 6) as dst:
    shutil.copyfileobj(src, dst)
EOF
ls -l "$WORK"/layer.tar "$WORK"/layer.tar.gz | awk '{print "layer:", $5, "bytes", $9}'

CASTIRON='from castiron.images.unpack import unpack_rootfs; from pathlib import Path; import sys; unpack_rootfs([open(sys.argv[1], "rb")], Path(sys.argv[2]))'
TARFILE='import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")'
for kind in tar tar.gz; do
    layer="$WORK/layer.$kind"
    out="$WORK/out"
    taropt=-xf
    [ "$kind" = tar.gz ] && taropt=-xzf
    echo
    echo "== layer.$kind"
    hyperfine --warmup 1 --runs "${RUNS:-5}" --style basic \
        --prepare "rm -rf $out" \
        -n castiron "$PY -c '$CASTIRON' $layer $out" \
        -n "tar -x" "mkdir $out && tar $taropt $layer -C $out" \
        -n tarfile "$PY -c '$TARFILE' $layer $out"
done
rm -rf "$WORK/out"
