#!/bin/bash
# Rebuilds what the GPU session kit carries when .cache/device is lost (a new checkout: .cache is
# ignored by git, so every fresh clone starts without it). CPU side, repo root, needs the package
# index and ../shared/data; a minute or two (a 256 MB wheel, pruned and xz-compressed):
#   bash examples/gpu_h200_kit/rebuild_cache.sh && bash examples/gpu_h200_kit/prepare.sh
# Each step is skipped when its output is already there (delete it to redo that step):
# 1. .cache/device/ort/ortgpu90.tar.xz - onnxruntime-gpu 1.31.1 (cp312) without the CPU library and
#    the TensorRT provider, its CUDA provider pruned to sm_90 cubins (prune_fatbin.py), xz -9;
# 2. .cache/device/whl - the 12 wheels, pycuda's sdist and its 4 dependency wheels for the
#    machine's Python 3.12 (prepare.sh then moves pycuda's parts to pycuda/);
# 3. .cache/device/data - covid-P001 and the COVID-CT-MD labels from ../shared/data.
# The pins are the kit's (README.md "Rebuilding the cache"); exit 1 at the first failed step.
set -u
cd "$(git rev-parse --show-toplevel)" || exit 1
K=examples/gpu_h200_kit
D=.cache/device
PY=${PYTHON:-python3}
SHARED=${CTSDK_SHARED_DATA:-../shared/data}
say() { echo "rebuild: $*"; }
die() { echo "rebuild: FAILED: $*"; exit 1; }
# the machine's interpreter and platform, not this one's
TARGET=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
mkdir -p $D/ort $D/whl $D/pycuda $D/data

# 1. onnxruntime-gpu, sm_90 only
if [ -f $D/ort/ortgpu90.tar.xz ]; then
    say "1/3 $D/ort/ortgpu90.tar.xz is there (delete it to rebuild)"
else
    say "1/3 onnxruntime-gpu 1.31.1: download (256 MB), prune to sm_90, xz -9"
    T=$(mktemp -d) || die "mktemp"
    trap 'rm -rf "$T"' EXIT
    $PY -m pip download -q "${TARGET[@]}" --platform manylinux_2_28_x86_64 -d "$T" onnxruntime-gpu==1.31.1 \
        || die "pip download onnxruntime-gpu==1.31.1 (is the package index reachable?)"
    mkdir -p "$T/pk" && $PY -m zipfile -e "$T"/onnxruntime_gpu-1.31.1-*.whl "$T/pk" || die "unzip the wheel"
    CAPI="$T/pk/onnxruntime/capi"
    rm -f "$CAPI/libonnxruntime.so.1.31.1" "$CAPI/libonnxruntime_providers_tensorrt.so"
    $PY $K/prune_fatbin.py "$CAPI/libonnxruntime_providers_cuda.so" "$T/cuda90.so" 90 || die "prune_fatbin.py"
    mv "$T/cuda90.so" "$CAPI/libonnxruntime_providers_cuda.so"
    tar -C "$T/pk" -cf - . | xz -9 -T0 > $D/ort/ortgpu90.tar.xz.part || die "tar | xz"
    mv $D/ort/ortgpu90.tar.xz.part $D/ort/ortgpu90.tar.xz
    say "   $(du -m $D/ort/ortgpu90.tar.xz | cut -f1) MB, sha256 $(sha256sum $D/ort/ortgpu90.tar.xz | cut -c1-16)"
fi

# 2. wheels (pycuda: its sdist; on the machine build_pycuda.sh builds it)
have() { ls $D/whl/$1 $D/pycuda/$1 >/dev/null 2>&1; }
if have 'polygraphy-*.whl' && have 'pycuda-*.tar.gz' && have 'pylibjpeg_libjpeg-*.whl'; then
    say "2/3 wheels are there (delete $D/whl and $D/pycuda to fetch again)"
else
    say "2/3 wheels for Python 3.12 (manylinux)"
    $PY -m pip download -q "${TARGET[@]}" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d $D/whl pydicom==3.0.2 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0 \
        pylibjpeg-rle==2.2.0 python-gdcm==3.2.6 imagecodecs==2026.3.6 xgboost-cpu==3.2.0 pynetdicom==3.0.4 \
        highdicom==0.28.2 pyjpegls==1.5.1 polygraphy==0.53.6 pytools==2026.1.1 mako==1.4.3 \
        platformdirs==4.14.9 siphash24==1.9 || die "pip download of the wheels"
    $PY -m pip download -q "${TARGET[@]}" --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
        -d $D/whl pylibjpeg-libjpeg==2.5.0 || die "pip download pylibjpeg-libjpeg==2.5.0"
    # pip reads the sdist's metadata with setup.py: a scratch venv with setuptools and wheel (GPU_NOTES)
    V=$(mktemp -d) || die "mktemp"
    $PY -m venv "$V" && "$V/bin/pip" install -q setuptools wheel || die "a scratch venv with setuptools and wheel"
    "$V/bin/pip" download -q --no-deps --no-binary=:all: --no-build-isolation -d $D/whl pycuda==2026.1 \
        || die "pip download of pycuda 2026.1's sdist"
    rm -rf "$V"
fi

# 3. the series the GPU report runs on, and its labels
SRC=$SHARED/dicom/covid-ct-md
if [ "$(ls $D/data/dicom/covid-ct-md/covid-P001 2>/dev/null | wc -l)" = 148 ]; then
    say "3/3 $D/data holds covid-P001"
else
    [ -d $SRC/covid-P001 ] || die "$SRC/covid-P001 not found (set CTSDK_SHARED_DATA to the shared data folder)"
    say "3/3 copying covid-P001 and labels from $SRC"
    mkdir -p $D/data/dicom/covid-ct-md && cp -r $SRC/covid-P001 $SRC/labels $D/data/dicom/covid-ct-md/ || die "copy"
fi
say "done: now bash $K/prepare.sh (it must end with 'prepare: ready')"
