// Masked global average pooling (docs/conventions.md "Lung-mask-weighted GAP" step 4).
// Reference: sdk.pooling.masked_gap.  p[n, c] = sum_hw f[n, c, hw] * w[n, hw], FP32 accumulation.
//
// Thread mapping (NCHW features, HW small - 49 for 7x7): one warp per (n, c), its lanes along HW.
// A channel's HW values are contiguous, and the 8 warps of a 256-thread block take 8 consecutive
// channels, so a block reads one contiguous 8*HW run (coalesced); lanes are summed with
// __shfl_xor_sync. The block first stages w[n, :] in shared memory (HW floats, dynamic).
// Grid: (ceil(C / warps_per_block), N). Threads along C (one thread per channel, loop over HW)
// would stride HW elements between neighbouring threads - uncoalesced in NCHW - so HW it is.
#include "ctsdk_common.cuh"

template <typename T>
__device__ __forceinline__ void masked_gap_body(const T* f, const float* w, int n, int C, int HW, float* out) {
    extern __shared__ float wsh[];
    const int b = blockIdx.y;
    if (b >= n) return;
    for (int p = threadIdx.x; p < HW; p += blockDim.x) wsh[p] = w[(long long)b * HW + p];
    __syncthreads();
    const int lane = threadIdx.x % CT_WARP, nwarps = blockDim.x / CT_WARP;
    const int c = blockIdx.x * nwarps + threadIdx.x / CT_WARP;
    if (c >= C) return;
    const long long nc = (long long)b * C + c;
    float v = ct_warp_sum(ct_gap_partial(f + nc * HW, wsh, HW, lane, CT_WARP));
    if (lane == 0) out[nc] = v;
}

extern "C" __global__ void ct_masked_gap_f32(const float* f, const float* w, int n, int C, int HW, float* out) {
    masked_gap_body(f, w, n, C, HW, out);
}

extern "C" __global__ void ct_masked_gap_f16(const ct_half* f, const float* w, int n, int C, int HW, float* out) {
    masked_gap_body(f, w, n, C, HW, out);
}
