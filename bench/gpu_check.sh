#!/usr/bin/env bash
# The CUDA check in one call of a lent GPU machine: the CUDA tests, then the whole benchmark on
# the device. Logs, the JSON results and nvidia-smi's view land in $OUT.
#
#   here:   bash bench/gpu_check.sh prepare     # .gpu/: wheels the GPU image lacks (Python 3.12),
#                                               # the val photos and reduced train photos (~30 MB)
#   there:  device run, carry [".gpu"], timeout_s 480, command: bash bench/gpu_check.sh
#
# Locally (no GPU), `PYTHON=.venv/bin/python BENCH_ARGS="--device cpu --quick" bash bench/gpu_check.sh`
# runs the same steps: the CUDA tests skip, the benchmark runs on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PHOTOS=${PHOTOS:-../shared/data/photos}

if [ "${1:-}" = prepare ]; then
    set -e
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/photos
    # Versions as this project's venv has them; watchdog, loguru, pypng and isal are not in the image.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl watchdog==7.1.0 loguru==0.7.3 pypng==0.20220715.0 isal==1.9.1
    cp -r "$PHOTOS/val" .gpu/photos/val
    # The daemon rows cut 256x256 and 1024x768 images from the train photos: a 1600 px long side is
    # enough for that and keeps the carried tree under its 64 MiB.
    "${PYTHON:-.venv/bin/python}" - "$PHOTOS/train" .gpu/photos/train <<'EOF'
import sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for f in sorted(src.rglob("*")):
    if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        continue
    out = dst / f.relative_to(src).with_suffix(".jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(f) as im:
        im = im.convert("RGB")
        im.thumbnail((1600, 1600), Image.Resampling.LANCZOS)
        im.save(out, quality=92)
EOF
    du -sh .gpu
    exit 0
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .gpu/whl ] && ! "$PY" -c "import watchdog, loguru, png, isal" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu/photos ] && PHOTOS=.gpu/photos

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } 2>&1 | tee "$OUT/machine.txt"

# The CUDA tests, and the engine tests that run on whatever device there is.
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_speed_paths.py tests/test_model.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}

timeout 300 "$PY" bench/benchmark.py ${BENCH_ARGS:---device cuda} --photos "$PHOTOS" --json "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log"
bench=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests, benchmark exit $bench" | tee -a "$OUT/machine.txt"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
