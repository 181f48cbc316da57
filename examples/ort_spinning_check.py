"""ORT intra-op spinning vs the classifier-input thread: wall and process CPU, side by side.

    .venv/bin/python examples/ort_spinning_check.py [--rounds 5]

The product's pipelined classification (Session.infer_batched with a builder) on covid-P001's
selected slices, with the bundle's INT8 classifier opened twice - ORT's default (intra-op threads
spin-wait between parallel sections) and ``session.intra_op.allow_spinning = 0`` - alternating.
Spinning threads take CPU from the thread that builds the next batch; this measures what it costs.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from sdk.paths import shared_data_root

DATA = shared_data_root() / "dicom"


def main() -> None:
    import onnxruntime as ort

    import sdk
    from sdk.io import load_series
    from sdk.runtime.ort import OrtSession
    from sdk.slices import select_slices
    from sdk.volume.resample import classifier_inputs_fast

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    tri = sdk.Triage(device="cpu", heatmaps=False)
    vol = load_series(DATA / "covid-ct-md" / "covid-P001")
    seg = tri._segment(vol)
    idx = np.asarray(select_slices(vol, seg.mask).indices)
    path = tri.bundle.classifier_paths()[tri.runtime["precision"]]
    sessions = {}
    for name, spin in (("spin", "1"), ("no-spin", "0")):
        s = OrtSession(path, device="cpu", threads=a.threads)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        s._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])  # measurement only
        sessions[name] = s

    def make(i0: int, i1: int) -> np.ndarray:
        return classifier_inputs_fast(vol.hu, seg.mask, idx[i0:i1], size=tri.size, window=tri.window)

    res = {k: {"wall": [], "cpu": []} for k in sessions}
    for s in sessions.values():
        s.infer_batched(make, int(idx.size), batch=tri.classifier_batch, input_name="image")
    for r in range(a.rounds):
        for k in (list(sessions) if r % 2 == 0 else list(sessions)[::-1]):
            c0, t0 = time.process_time(), time.perf_counter()
            sessions[k].infer_batched(make, int(idx.size), batch=tri.classifier_batch, input_name="image")
            res[k]["wall"].append((time.perf_counter() - t0) * 1e3)
            res[k]["cpu"].append((time.process_time() - c0) * 1e3)
    print(f"{idx.size} slices, batch {tri.classifier_batch}, {a.threads} ORT threads, {tri.runtime['precision']}")
    for k, v in res.items():
        print(f"{k:8s} wall {np.median(v['wall']):7.0f} ms  cpu {np.median(v['cpu']):7.0f} ms")


if __name__ == "__main__":
    main()
