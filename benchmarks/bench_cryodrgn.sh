#!/usr/bin/env bash
# bench_cryodrgn.sh: CPU training throughput of cryoDRGN 4.3.1 (train_vae) on z3's benchmark
# dataset, to put beside z3's own training rate.
#
# What it runs: `cryodrgn train_vae` for 1 epoch (EPOCHS to change) on the preprocessed demo
# data of benchmarks/common.py:demo_dataset(n=5000, box=64) (2 Å/px), with encoder and decoder
# 256 wide x 3 hidden layers (resid encoder, gaussian positional encoding, fourier decoder:
# cryoDRGN's defaults), batch 16, zdim 8, fp32 (--no-amp; AMP is CUDA-only in cryoDRGN),
# no checkpoint evaluation and no post-training analysis. Images are loaded into memory (no
# --lazy: 5000 x 65 x 65 float32 is ~85 MB). It prints, per epoch, the training images/s =
# particles / the epoch time that cryoDRGN logs itself ("=====> Epoch: k ... Finished in
# H:MM:SS"), which covers the training loop only (batches, loss, optimiser; data in memory),
# not start-up, dataset loading or the final z evaluation; the whole command's wall time is
# printed too. Torch uses its default thread count (all cores); set OMP_NUM_THREADS to change it.
#
# Usage:
#   benchmarks/bench_cryodrgn.sh            # full measurement: all particles (5000), 1 epoch
#   benchmarks/bench_cryodrgn.sh 500        # smoke test: the first 500 particles only (--ind)
#   EPOCHS=2 benchmarks/bench_cryodrgn.sh   # more epochs (a rate is printed for each)
#   benchmarks/bench_cryodrgn.sh prepare [PRE_PARTICLES_STAR]
#                                           # (re)make the cryoDRGN inputs in $DRGN_DATA from
#                                           # a z3 preprocessed STAR (default: the one that
#                                           # demo_dataset(n=5000, box=64) gives, made if needed)
#
# It needs, outside the repository (nothing here is installed into z3's .venv):
#   1. a venv with cryoDRGN, $DRGN_VENV (default /tmp/drgn), built so (about 2 minutes):
#        python3.11 -m venv /tmp/drgn
#        /tmp/drgn/bin/pip install torch==2.13.0     # FIRST and pinned: the CPU wheel found via
#                                                    # PIP_FIND_LINKS; a bare `torch` pulls CUDA
#        /tmp/drgn/bin/pip install cryodrgn==4.3.1   # keeps torch 2.13.0 (its pin allows it)
#        /tmp/drgn/bin/cryodrgn --help
#   2. the data, $DRGN_DATA (default /tmp/drgn_data): particles.star + its stack, pose.pkl and
#      ctf.pkl, made by `benchmarks/bench_cryodrgn.sh prepare`. It copies the z3 preprocessed
#      STAR (RELION 3.1, optics group) and its stack and converts with cryoDRGN's own parsers:
#        cryodrgn parse_pose_star particles.star -D 64 --Apix 2.0 -o pose.pkl
#        cryodrgn parse_ctf_star  particles.star -D 64 --Apix 2.0 -o ctf.pkl
#      (box and pixel size read from the STAR's optics table, not the MRC header). Both parse
#      the RELION 3.1 file directly: Euler angles through cryoDRGN's R_from_relion, shifts
#      _rlnOriginX/YAngst / Apix / D (cryoDRGN's standard RELION reading, no sign changes of
#      ours); voltage, Cs and amplitude contrast from the optics group. z3's preprocessed images
#      are sign-corrected to positive contrast (particle bright), so train_vae gets
#      --uninvert-data (cryoDRGN's default inverts, expecting raw dark-particle micrographs); the
#      compute is the same either way.
set -euo pipefail

DRGN_VENV=${DRGN_VENV:-/tmp/drgn}
DRGN_DATA=${DRGN_DATA:-/tmp/drgn_data}
EPOCHS=${EPOCHS:-1}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CRYODRGN=$DRGN_VENV/bin/cryodrgn
PY=$DRGN_VENV/bin/python

if [[ ! -x $CRYODRGN ]]; then
    echo "no cryoDRGN at $CRYODRGN: build the venv as the header of $0 says" >&2
    exit 1
fi

prepare() {
    local star=${1:-}
    if [[ -z $star ]]; then
        star=$(cd "$ROOT" && .venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks')
from common import demo_dataset
print(demo_dataset(n=5000, box=64)['pre_particles'])" | tail -n 1)
    fi
    mkdir -p "$DRGN_DATA"
    # Copy the STAR and the stack(s) it names; read box and pixel size from the optics table.
    read -r box apix < <("$PY" - "$star" "$DRGN_DATA" <<'EOF'
import shutil, sys
from pathlib import Path
import starfile
star, dest = Path(sys.argv[1]), Path(sys.argv[2])
blocks = starfile.read(star, always_dict=True)
parts = blocks["particles"]
optics = blocks.get("optics")
row = optics.iloc[0] if optics is not None else parts.iloc[0]
box = int(row["rlnImageSize"]) if "rlnImageSize" in row else None
apix = float(row["rlnImagePixelSize"])
for stack in sorted({n.split("@", 1)[1] for n in parts["rlnImageName"]}):
    assert not Path(stack).is_absolute(), stack
    (dest / stack).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(star.parent / stack, dest / stack)
shutil.copyfile(star, dest / "particles.star")
if box is None:  # no rlnImageSize: the stack's own shape
    import numpy as np
    hdr = np.fromfile(dest / stack, dtype="<i4", count=3)
    box = int(hdr[0])
print(box, apix)
EOF
    )
    echo "source: $star (prepared $(date '+%F %T'); box $box, $apix A/px)" > "$DRGN_DATA/SOURCE.txt"
    "$CRYODRGN" parse_pose_star "$DRGN_DATA/particles.star" -D "$box" --Apix "$apix" -o "$DRGN_DATA/pose.pkl"
    "$CRYODRGN" parse_ctf_star "$DRGN_DATA/particles.star" -D "$box" --Apix "$apix" -o "$DRGN_DATA/ctf.pkl"
    cat "$DRGN_DATA/SOURCE.txt"
}

if [[ ${1:-} == prepare ]]; then
    prepare "${2:-}"
    exit 0
fi

for f in particles.star pose.pkl ctf.pkl; do
    if [[ ! -f $DRGN_DATA/$f ]]; then
        echo "no $DRGN_DATA/$f: run '$0 prepare' first" >&2
        exit 1
    fi
done

total=$("$PY" -c "import pickle; print(len(pickle.load(open('$DRGN_DATA/pose.pkl', 'rb'))[0]))")
n=${1:-$total}
out=$(mktemp -d /tmp/bench_cryodrgn.XXXXXX)
ind=()
if (( n < total )); then
    "$PY" -c "import numpy as np, pickle; pickle.dump(np.arange($n), open('$out/ind.pkl', 'wb'))"
    ind=(--ind "$out/ind.pkl")
elif (( n > total )); then
    echo "only $total particles in $DRGN_DATA" >&2
    exit 1
fi

echo "cryoDRGN $("$PY" -c 'import cryodrgn; print(cryodrgn.__version__)'), torch $("$PY" -c 'import torch; print(torch.__version__, "threads", torch.get_num_threads())')"
echo "data: $(cat "$DRGN_DATA/SOURCE.txt" 2>/dev/null || echo "$DRGN_DATA")"
echo "particles: $n of $total, epochs: $EPOCHS, output: $out"
t0=$(date +%s.%N)
"$CRYODRGN" train_vae "$DRGN_DATA/particles.star" --datadir "$DRGN_DATA" \
    --poses "$DRGN_DATA/pose.pkl" --ctf "$DRGN_DATA/ctf.pkl" "${ind[@]}" \
    -o "$out/train" --zdim 8 -n "$EPOCHS" -b 16 \
    --enc-dim 256 --enc-layers 3 --dec-dim 256 --dec-layers 3 \
    --uninvert-data --no-amp --checkpoint 0 --no-analysis --seed 0 > "$out/train.log" 2>&1 || {
    tail -n 30 "$out/train.log" >&2
    exit 1
}
t1=$(date +%s.%N)

# "(INFO) ... # =====> Epoch: 1 Average gen loss = ..., ...; Finished in 0:01:02.345678"
"$PY" - "$out/train.log" "$n" "$t0" "$t1" <<'EOF'
import re, sys
log, n, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pat = re.compile(r"=====> Epoch: (\d+) .*Finished in (?:(\d+) days?, )?(\d+):(\d+):(\d+(?:\.\d+)?)")
epochs = []
for line in open(log):
    m = pat.search(line)
    if m:
        k, days, h, mi, s = m.groups()
        epochs.append((int(k), int(days or 0) * 86400 + int(h) * 3600 + int(mi) * 60 + float(s)))
if not epochs:
    sys.exit(f"no epoch time found in {log}")
for k, sec in epochs:
    print(f"epoch {k}: {n} images in {sec:.2f} s = {n / sec:.1f} images/s (cryoDRGN train_vae, training loop)")
print(f"whole command: {t1 - t0:.1f} s wall (start-up, loading, training, final z evaluation)")
EOF
echo "log: $out/train.log"
