#!/bin/bash
# CPU side, in the repo root. Calls A-C cannot carry their 58/57/40 MiB beside the bundle's ONNX
# files (27 MiB of the 32 MiB working tree), so those files leave the working tree for the session:
# they wait in .cache/device/bundle (ignored), which call D carries; run_d.sh copies them back into
# sdk/bundles/default on the machine. So no step is needed here between the calls.
#   bash examples/gpu_h200_kit/hold_bundle.sh out    # before call A
#   bash examples/gpu_h200_kit/hold_bundle.sh in     # after call D (or after any failure): back, checked with git
#   bash examples/gpu_h200_kit/hold_bundle.sh status
# While they are out, nothing in this checkout can run ctsdk (tests, Triage, helpers): keep it short.
# Touches no git state (no index, no commit); only moves the files.
set -u
cd "$(git rev-parse --show-toplevel)" || exit 1
B=sdk/bundles/default
H=.cache/device/bundle
case "${1:-status}" in
out)
    if ls $H/*.onnx >/dev/null 2>&1; then echo "hold_bundle: $H already holds ONNX files (out already done?); 'status', or 'in' first"; exit 1; fi
    if ! git diff --quiet -- $B; then echo "hold_bundle: $B has local changes; not moving it"; git status --short -- $B; exit 1; fi
    mkdir -p $H && mv $B/*.onnx $H/ && echo "hold_bundle: moved $(ls $H/*.onnx | wc -l) ONNX files ($(du -sh $H | cut -f1)) to $H" ;;
in)
    if ! ls $H/*.onnx >/dev/null 2>&1; then echo "hold_bundle: nothing held in $H"; else mv $H/*.onnx $B/ && rmdir $H 2>/dev/null; fi
    if git diff --quiet -- $B && [ -z "$(git ls-files --deleted -- $B)" ]; then echo "hold_bundle: $B complete and unchanged"
    else echo "hold_bundle: $B differs from git:"; git status --short -- $B; exit 1; fi ;;
status)
    n=$(git ls-files --deleted -- "$B/*.onnx" | wc -l)
    echo "hold_bundle: $n of $(git ls-files -- "$B/*.onnx" | wc -l) bundle ONNX files out of the tree; held in $H: $(ls $H/*.onnx 2>/dev/null | wc -l)" ;;
*) echo "usage: hold_bundle.sh out|in|status"; exit 2 ;;
esac
