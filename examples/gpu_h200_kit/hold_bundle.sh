#!/bin/bash
# CPU side, in the repo root. Calls A-C cannot carry their 58/57/40 MiB beside the working tree's
# heavy tracked files - the bundle's ONNX files (27 MiB) and docs/ (4 MiB: benchmark reports and
# charts) - so those leave the working tree for the session: they wait in .cache/device/bundle and
# .cache/device/docs (ignored by git), which call D carries; run_d.sh copies them back into place on
# the machine. So no step is needed here between the calls.
#   bash examples/gpu_h200_kit/hold_bundle.sh out    # before call A
#   bash examples/gpu_h200_kit/hold_bundle.sh in     # after call D (or after any failure): back, checked with git
#   bash examples/gpu_h200_kit/hold_bundle.sh status
# While they are out, nothing in this checkout can run ctsdk or its tests (tests, Triage, helpers):
# keep it short. Touches no git state (no index, no commit); only moves the files.
set -u
cd "$(git rev-parse --show-toplevel)" || exit 1
B=sdk/bundles/default
H=.cache/device/bundle
HD=.cache/device/docs
case "${1:-status}" in
out)
    if ls $H/*.onnx >/dev/null 2>&1 || [ -d $HD ]; then echo "hold_bundle: $H or $HD already holds files (out already done?); 'status', or 'in' first"; exit 1; fi
    for p in $B docs; do
        if ! git diff --quiet -- $p || [ -n "$(git ls-files --others --exclude-standard -- $p)" ]; then
            echo "hold_bundle: $p has local changes; not moving it"; git status --short -- $p; exit 1; fi
    done
    mkdir -p $H && mv $B/*.onnx $H/ && echo "hold_bundle: moved $(ls $H/*.onnx | wc -l) ONNX files ($(du -sh $H | cut -f1)) to $H"
    mv docs $HD && echo "hold_bundle: moved docs/ ($(du -sh $HD | cut -f1)) to $HD" ;;
in)
    if ! ls $H/*.onnx >/dev/null 2>&1; then echo "hold_bundle: no ONNX files held in $H"; else mv $H/*.onnx $B/ && rmdir $H 2>/dev/null; fi
    if [ -d $HD ]; then
        if [ -e docs ]; then echo "hold_bundle: both docs/ and $HD exist; not merging them"; exit 1; fi
        mv $HD docs
    else echo "hold_bundle: no docs/ held in $HD"; fi
    ok=1
    for p in $B docs; do
        if ! git diff --quiet -- $p || [ -n "$(git ls-files --deleted -- $p)" ]; then ok=0; echo "hold_bundle: $p differs from git:"; git status --short -- $p; fi
    done
    [ $ok = 1 ] && echo "hold_bundle: $B and docs/ complete and unchanged" || exit 1 ;;
status)
    n=$(git ls-files --deleted -- "$B/*.onnx" | wc -l)
    echo "hold_bundle: $n of $(git ls-files -- "$B/*.onnx" | wc -l) bundle ONNX files out of the tree; held in $H: $(ls $H/*.onnx 2>/dev/null | wc -l)"
    echo "hold_bundle: docs/ $( [ -d docs ] && echo in the tree || echo 'out of the tree')$( [ -d $HD ] && echo "; held in $HD")" ;;
*) echo "usage: hold_bundle.sh out|in|status"; exit 2 ;;
esac
