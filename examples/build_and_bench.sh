#!/usr/bin/env bash
# The flow on a target NVIDIA GPU: build TensorRT engines from the bundle's ONNX, then benchmark
# and triage with them. Engines are never shipped: they are built here, on the target, and cached
# beside the bundle (key: GPU name, compute capability, TensorRT version, precision, ONNX sha256).
#
#   examples/build_and_bench.sh [SERIES_DIR] [BUNDLE_DIR]      (OUT=dir, SKIP_BENCH=1 to skip ctsdk bench)
#
# Needs `pip install 'ctsdk[gpu]'` (TensorRT from NVIDIA's index, onnxruntime-gpu instead of
# onnxruntime - see docs/deployment.md). Without TensorRT `ctsdk build-engine` exits 2 with
# "install ctsdk[gpu] (TensorRT)"; the script then falls back to ONNX Runtime's CUDA provider.
set -euo pipefail

SERIES="${1:-../shared/data/dicom/covid-ct-md/covid-P001}"
BUNDLE="${2:-$(python -c 'from sdk.bundle import DEFAULT_BUNDLE_DIR; print(DEFAULT_BUNDLE_DIR)')}"
OUT="${OUT:-runs/target}"
mkdir -p "$OUT"

echo "== bundle: $BUNDLE" >&2
python -m sdk.bundle verify "$BUNDLE" > "$OUT/bundle.json"
CACHE="$(python -c "from sdk.bundle import load_bundle; print(load_bundle('$BUNDLE').engine_cache_dir())")"
mkdir -p "$CACHE"
echo "== engine cache: $CACHE" >&2

nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv >&2 || echo "no nvidia-smi: not a GPU machine?" >&2

have_trt=1
for prec in fp16 int8; do
  onnx="$BUNDLE/classifier_${prec}.onnx"
  [ -f "$onnx" ] || { echo "skip $prec: $onnx not in the bundle" >&2; continue; }
  # cold build, then a warm rebuild reusing the timing cache (--measure-warm reports both times);
  # a bundle's file goes to the bundle's engine cache ($CACHE), where Triage looks for it
  if ! ctsdk build-engine --model classifier --bundle "$BUNDLE" --precision "$prec" --batch 1,8,32 \
       --timing-cache "$CACHE/timing.cache" --measure-warm --json \
       > "$OUT/build_${prec}.json"; then
    have_trt=0; break
  fi
done

if [ "$have_trt" = 1 ]; then
  DEVICE=tensorrt
else
  echo "TensorRT unavailable: benchmarking ONNX Runtime CUDA (FP16 / INT8 ONNX) instead" >&2
  DEVICE=cuda
fi

# per-stage latency of every usable runtime against the naive baseline
[ "${SKIP_BENCH:-0}" = 1 ] || ctsdk bench "$SERIES" --bundle "$BUNDLE" --runtimes naive,ort-fp32,ort-int8,ort-cuda-fp16,trt-fp16,trt-int8 --json \
    > "$OUT/bench.json" || echo "ctsdk bench failed (see stderr)" >&2

# one triage per precision on the target device, with heat maps for the top slices
for prec in fp16 int8; do
  ctsdk triage "$SERIES" --bundle "$BUNDLE" --device "$DEVICE" --precision "$prec" --json \
      --heatmaps "$OUT/heatmaps_${prec}" --top 8 > "$OUT/triage_${DEVICE}_${prec}.json" \
    || echo "triage on $DEVICE/$prec failed (see stderr)" >&2
done
ctsdk triage "$SERIES" --bundle "$BUNDLE" --device cpu --precision fp32 --json > "$OUT/triage_cpu_fp32.json"

python - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for p in sorted(out.glob("triage_*.json")):
    text = p.read_text().strip()
    if not text:
        print(f"{p.stem:24s} failed (no result; see the log above)")
        continue
    d = json.loads(text)
    print(f"{p.stem:24s} {d['label']:12s} P(covid)={d['probabilities'].get('covid', float('nan')):.4f} "
          f"total={d['timings_ms']['total']:.0f} ms runtime={d['runtime']}")
EOF
