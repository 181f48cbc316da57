#!/bin/bash
# CPU side, in the repo root, before the device calls (seconds; writes only under .cache/device):
#   bash examples/gpu_h200_kit/prepare.sh
# 1. copies this kit's scripts into .cache/device/bin (the folder every call carries);
# 2. moves pycuda's sdist and its four dependency wheels from whl/ to pycuda/ (they travel in call C);
# 3. checks that every file the calls carry is there, and writes bin/MANIFEST.sha256 (checked on the
#    machine by each setup script, so a broken transfer stops the call at once);
# 4. prints what each call sends against the tool's 64 MiB (working tree + carried paths).
# Exit 1 when something is missing or a call would be over the limit.
set -u
cd "$(git rev-parse --show-toplevel)" || exit 1
K=examples/gpu_h200_kit
D=.cache/device
LIMIT=$((64 * 1024 * 1024))
bad=0
say() { echo "prepare: $*"; }
fail() { echo "prepare: MISSING/ERROR: $*"; bad=1; }

# 1. scripts
rm -rf $D/bin && mkdir -p $D/bin
cp $K/env.sh $K/setup_a.sh $K/setup_b.sh $K/setup_c.sh $K/build_pycuda.sh $K/run_d.sh $K/ort_probe.py $D/bin/

# 2. pycuda's parts travel in call C (call B is at the limit with the wheels)
mkdir -p $D/pycuda
for f in $D/whl/pycuda-*.tar.gz $D/whl/pytools-*.whl $D/whl/mako-*.whl $D/whl/platformdirs-*.whl $D/whl/siphash24-*.whl; do
    [ -e "$f" ] && mv "$f" $D/pycuda/
done

# 3. what must be there
[ -f $D/ort/ortgpu90.tar.xz ] || fail "$D/ort/ortgpu90.tar.xz (onnxruntime-gpu 1.31.1, sm_90 cubins only: README.md 'Rebuilding the cache')"
for w in pydicom- pylibjpeg-2 pylibjpeg_libjpeg- pylibjpeg_openjpeg- pylibjpeg_rle- python_gdcm- imagecodecs- xgboost_cpu- \
         pynetdicom- highdicom- pyjpegls- polygraphy-; do
    n=$(ls $D/whl/${w}*.whl 2>/dev/null | wc -l)
    [ "$n" = 1 ] || fail "$D/whl/${w}*.whl: $n files (one expected)"
done
for w in pycuda-2026.1.tar.gz pytools-*.whl mako-*.whl platformdirs-*.whl siphash24-*.whl; do
    ls $D/pycuda/$w >/dev/null 2>&1 || fail "$D/pycuda/$w"
done
n=$(ls $D/data/dicom/covid-ct-md/covid-P001 2>/dev/null | wc -l)
[ "$n" = 148 ] || fail "$D/data/dicom/covid-ct-md/covid-P001: $n files (148 expected; copy ../shared/data/dicom/covid-ct-md/covid-P001)"
ls $D/data/dicom/covid-ct-md/labels/Index.csv >/dev/null 2>&1 || fail "$D/data/dicom/covid-ct-md/labels (copy ../shared/data/dicom/covid-ct-md/labels)"
(cd $D && find ort whl pycuda data -type f | sort | xargs -d '\n' sha256sum) > $D/bin/MANIFEST.sha256 || fail "sha256sum"
say "$(wc -l < $D/bin/MANIFEST.sha256) carried files listed in $D/bin/MANIFEST.sha256"

# 4. sizes (what the device tool sends: tracked files present on disk + untracked-not-ignored + carried)
bytes() { [ $# -eq 0 ] && { echo 0; return; }; du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
onnx=$(git ls-files -z 'sdk/bundles/default/*.onnx' | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
docs=$(git ls-files -z docs | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
held=$( [ -f sdk/bundles/default/classifier_fp32.onnx ] && echo no || echo yes )
if [ "$held" = yes ]; then light=$tree; onnx=$(( $(bytes $D/bundle) + $(bytes $D/docs) )); else light=$((tree - onnx - docs)); onnx=$((onnx + docs)); fi
bin=$(bytes $D/bin)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
row() {  # name, tree bytes, carried paths...
    local name=$1 t=$2; shift 2
    local c; c=$(bytes "$@"); [ "$name" = D ] && c=$onnx
    local tot=$((t + c + bin)); local mark=ok
    [ $tot -gt $LIMIT ] && { mark="OVER 64 MiB"; bad=1; }
    printf 'prepare: call %s  tree %-10s + carried %-10s = %-10s %s   carry: %s %s\n' "$name" "$(mib $t)" "$(mib $((c + bin)))" "$(mib $tot)" "$mark" "$*" "$D/bin"
}
say "working tree now $(mib $tree) (bundle ONNX files and docs/ held out in $D/bundle, $D/docs: $held); without them $(mib $light); they are $(mib $onnx)"
row A "$light" $D/ort
row B "$light" $D/whl
row C "$light" $D/data $D/pycuda
row D "$light" $D/bundle $D/docs   # + the ONNX files and docs/, wherever they are now

[ $bad = 0 ] && say "ready" || say "NOT ready (see above)"
exit $bad
