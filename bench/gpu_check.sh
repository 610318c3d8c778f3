#!/usr/bin/env bash
# Device check of the GPU path, in one call of a few minutes on one GPU (sized for an H200: < 8 min).
#
#   bash bench/gpu_wheels.sh          # once, where pip reaches a registry: pure-Python wheels into .whl/
#   OUT=/some/dir bash bench/gpu_check.sh [--dry]
#
# For a machine whose python3 has torch, torchvision, timm, scikit-image and pytest but not this
# project's other dependencies: the wheels in .whl/ (webdataset, braceexpand) are installed with
# pip --no-index into /tmp/site. faiss, ray and open_clip are not needed: the encoders are timm
# ViT-B/32 and ViT-L/14 CLIP towers with random weights, the search is index.torch_search.
# Steps, each writing under $OUT:
#   env.txt          GPU, driver, torch/torchvision/timm versions
#   tests.log        the CUDA tests (tests/test_device_crops.py, tests/test_torch_search.py)
#   embed_b32.json   bench/embed.py, timm:vit_base_patch32_clip_224, 1000 real JPEGs x 10 crops of 224 px
#   embed_l14.json   bench/embed.py, timm:vit_large_patch14_clip_224, 600 JPEGs x 10 crops, goal 1500 crops/s
#   search_gpu.json  bench/search.py --device cuda: 1000 queries, k = 10000, 10M x 768 float16
#   gpu_check.json   every target of the above, and whether all were met
#   log.txt          the benchmarks' stderr (progress, warnings)
# --dry runs the same steps on the CPU at smoke sizes (tests/test_bench_smoke.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: >"$OUT/log.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ $DRY = 0 ] && [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

if [ $DRY = 1 ]; then
  DEV=cpu
  EMBED=(--smoke --crops-on-device --photo-crops --device cpu)
  B32=(); L14=(--crops-per-s-goal 1500)
  SEARCH=(--device cpu --smoke)
else
  DEV=cuda
  EMBED=(--device cuda --image-size 0 --crops 10 --size 224 --photo-crops --repeats 2)
  B32=(--encoder timm:vit_base_patch32_clip_224 --images 1000)
  L14=(--encoder timm:vit_large_patch14_clip_224 --images 600 --crops-per-s-goal 1500)
  SEARCH=(--device cuda --num-vectors 10000000 --dim 768 --queries 1000 --k 10000)
fi

{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  $PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__, 'cuda', torch.cuda.is_available())"; } >"$OUT/env.txt" 2>&1
echo "device $DEV; $(tail -1 "$OUT/env.txt")"

status=0
if [ $DRY = 0 ]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_device_crops.py tests/test_torch_search.py >"$OUT/tests.log" 2>&1 \
    || status=1
  tail -3 "$OUT/tests.log"
fi
run() {  # name, then the command; the JSON result is the last object on stdout
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*" >>"$OUT/log.txt"
  "$@" >"$OUT/$name.json" 2>>"$OUT/log.txt" || { echo "$name failed:"; tail -20 "$OUT/log.txt"; status=1; }
  echo "$name: $((SECONDS - t0)) s"
}
run embed_b32 $PY bench/embed.py "${EMBED[@]}" "${B32[@]}"
run embed_l14 $PY bench/embed.py "${EMBED[@]}" "${L14[@]}"
run search_gpu $PY bench/search.py "${SEARCH[@]}"

$PY - "$OUT" "$DEV" <<'PYEOF'
import json, sys
from pathlib import Path
out, dev = Path(sys.argv[1]), sys.argv[2]
summary = {"device": dev, "targets": {}, "results": {}}
for name in ("embed_b32", "embed_l14", "search_gpu"):
    text = (out / f"{name}.json").read_text() if (out / f"{name}.json").exists() else ""
    try:
        report = json.loads(text[text.index("{"):]) if "{" in text else None
    except ValueError:
        report = None
    summary["results"][name] = None if report is None else {
        k: report.get(k) for k in ("encoder", "gpu", "crops", "batch_size", "crops_per_s", "gpu_throughput_ratio",
                                   "gemm_bound_s", "search_s", "search_over_gemm_bound", "ids_agree_with_reference")
        if k in report}
    for t, v in ((report or {}).get("targets") or {}).items():
        summary["targets"][f"{name}.{t}"] = v
summary["all_met"] = bool(summary["targets"]) and all(v.get("met") for v in summary["targets"].values())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary["targets"], indent=1))
PYEOF
exit $status
