// Mask -> pooling weights (docs/conventions.md "Lung-mask-weighted GAP" steps 1-3).
// Reference: sdk.pooling.mask_weights.
//
// Thread mapping: one block per sample n (blockDim a multiple of 32, e.g. 256). Step 1: warp w
// computes the area average of grid cells w, w + nwarps, ...; its lanes walk the cell's footprint
// row-major (coalesced along image rows) and are summed with __shfl_xor_sync. Step 2: thread t
// smooths cell t (3x3 Gaussian, zero padding). Step 3: thread 0 sums the grid in order and every
// thread normalises (uniform weights when the sum < 1e-6). Dynamic shared memory: 2 * gh * gw
// floats. The mask is read with a per-sample stride, so channel 1 of a (N, 3, S, S) classifier
// input buffer can be passed directly (mask = input + S*S, stride = 3*S*S).
#include "ctsdk_common.cuh"

extern "C" __global__ void ct_mask_weights(const float* mask, long long sample_stride, int n, int H,
                                           int W, int gh, int gw, float* out) {
    extern __shared__ float sh[];
    float* cells = sh;
    float* smooth = sh + gh * gw;
    __shared__ float total;
    const int b = blockIdx.x;
    if (b >= n) return;
    const float* m = mask + b * sample_stride;
    const int ncell = gh * gw;
    const int lane = threadIdx.x % CT_WARP, warp = threadIdx.x / CT_WARP, nwarps = blockDim.x / CT_WARP;
    for (int c = warp; c < ncell; c += nwarps) {
        float v = ct_warp_sum(ct_cell_area_partial(m, H, W, gh, gw, c / gw, c % gw, lane, CT_WARP));
        if (lane == 0) cells[c] = v;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < ncell; c += blockDim.x) smooth[c] = ct_gauss3(cells, gh, gw, c / gw, c % gw);
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (int c = 0; c < ncell; ++c) s += smooth[c];
        total = s;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < ncell; c += blockDim.x)
        out[(long long)b * ncell + c] = ct_normalise_weight(smooth[c], total, ncell);
}
