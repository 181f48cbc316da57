# sourced on the GPU machine from the repo root: puts onnxruntime-gpu, the wheels and pycuda first on the path
export PYTHONUNBUFFERED=1
D=$PWD/.cache/device
export PYTHONPATH=$D/site:$D/sitepkgs:$D/pycuda_site:$PWD
NVLIBS=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for p in glob.glob(os.path.join(sp, "nvidia", "*", "lib")) + glob.glob(os.path.join(sp, "nvidia", "cu13", "lib")):
        dirs.add(p)
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$NVLIBS:${LD_LIBRARY_PATH:-}
export CTSDK_SHARED_DATA=$D/data
# the checkout imports `sdk` from the source tree: map the top-level folders the way pyproject does at install
for m in kernels export calibration; do [ -e sdk/$m ] || ln -s ../$m sdk/$m; done

# need WHAT...: stop this call at once (exit 3) when an earlier call's result is not on this machine.
# The machine keeps .cache/device/* only while it stays warm (30 s after a call); a later call on a
# fresh machine finds none of it - then start again at call A (README.md).
need() {
    local miss=()
    for w in "$@"; do
        case $w in
            ort)     [ -f "$D/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" ] || miss+=("onnxruntime-gpu in $D/site (call A)");;
            wheels)  [ -f "$D/sitepkgs/.installed" ] || miss+=("the wheels in $D/sitepkgs (call B)");;
            data)    [ -d "$D/data/dicom/covid-ct-md/covid-P001" ] || miss+=("covid-P001 in $D/data (call C)");;
            pycuda)  [ -f "$D/pycuda_build.log" ] || miss+=("the pycuda build started by call C");;
            bundle)  ls sdk/bundles/default/classifier_fp16.onnx >/dev/null 2>&1 || miss+=("the bundle's ONNX files: in sdk/bundles/default, or carried as .cache/device/bundle (call D)");;
            docs)    [ -d docs ] || miss+=("docs/: in the tree, or carried as .cache/device/docs (call D)");;
            *)       [ -e "$D/$w" ] || miss+=("$D/$w");;
        esac
    done
    if [ ${#miss[@]} -gt 0 ]; then
        printf 'KIT STOP: missing on this machine: %s\n' "${miss[@]}"
        echo "KIT STOP: a fresh machine (gap > 30 s, or a failed call) loses the earlier calls' work: redo from call A"
        exit 3
    fi
}

# verify PART...: the files of these carried parts arrived whole (bin/MANIFEST.sha256, written by prepare.sh)
verify() {
    [ -f "$D/bin/MANIFEST.sha256" ] || { echo "KIT STOP: $D/bin/MANIFEST.sha256 missing (run examples/gpu_h200_kit/prepare.sh before the calls)"; exit 3; }
    local pat; pat=$(printf '  %s/|' "$@"); pat=${pat%|}
    (cd "$D" && grep -E "$pat" bin/MANIFEST.sha256 | sha256sum -c --quiet) \
        || { echo "KIT STOP: carried files of '$*' are missing or differ from bin/MANIFEST.sha256"; exit 3; }
}
