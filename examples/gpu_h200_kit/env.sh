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
