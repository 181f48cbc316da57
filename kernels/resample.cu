// Resampling kernels (docs/conventions.md "Resampling", "HU windowing and classifier input").
// Reference: sdk.volume.resample.resample_volume / classifier_inputs.
//
// Thread mapping: one thread per output element, x (fastest-varying) along threadIdx.x, so writes
// are fully coalesced and neighbouring threads read neighbouring input columns; a grid-stride loop
// covers any size. All arithmetic is in ctsdk_common.cuh.
#include "ctsdk_common.cuh"

template <typename TIn, typename TOut>
__device__ __forceinline__ void resample3d_body(
    const TIn* vol, int nz, int ny, int nx, const double* zc, double dz, double dy, double dx,
    int oz, int oy, int ox, double z_lo, double z_len, double y_lo, double y_len, double x_lo,
    double x_len, int mode, float fill, int windowed, float lo, float hi, TOut* out) {
    const ct_axis az = ct_make_axis(nz, oz, dz, zc[0], zc, z_lo, z_len);
    const ct_axis ay = ct_make_axis(ny, oy, dy, 0.5 * dy, 0, y_lo, y_len);
    const ct_axis ax = ct_make_axis(nx, ox, dx, 0.5 * dx, 0, x_lo, x_len);
    const long long total = (long long)oz * oy * ox;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        int i = (int)(idx % ox);
        long long r = idx / ox;
        int j = (int)(r % oy);
        int k = (int)(r / oy);
        float v = ct_resample_voxel(vol, ny, nx, az, ay, ax, k, j, i, mode, fill);
        if (windowed) v = ct_window(v, lo, hi);
        ct_store(out, idx, v);
    }
}

#define CT_RESAMPLE3D(NAME, TIN, TOUT)                                                              \
    extern "C" __global__ void NAME(                                                                \
        const TIN* vol, int nz, int ny, int nx, const double* zc, double dz, double dy, double dx, \
        int oz, int oy, int ox, double z_lo, double z_len, double y_lo, double y_len, double x_lo,  \
        double x_len, int mode, float fill, int windowed, float lo, float hi, TOUT* out) {          \
        resample3d_body<TIN, TOUT>(vol, nz, ny, nx, zc, dz, dy, dx, oz, oy, ox, z_lo, z_len, y_lo, \
                                   y_len, x_lo, x_len, mode, fill, windowed, lo, hi, out);          \
    }

CT_RESAMPLE3D(ct_resample3d_i16_f32, short, float)
CT_RESAMPLE3D(ct_resample3d_i16_f16, short, ct_half)
CT_RESAMPLE3D(ct_resample3d_f32_f32, float, float)
CT_RESAMPLE3D(ct_resample3d_f32_f16, float, ct_half)

// Classifier inputs: out (N, 3, S, S) float32. Grid (ceil(S*S / blockDim), N); thread per pixel.
template <typename TIn>
__device__ __forceinline__ void classifier_body(const TIn* vol, const unsigned char* mask, int nz,
                                                int ny, int nx, const int* slices, int n, int S,
                                                float lo, float hi, float* out) {
    const int b = blockIdx.y;
    if (b >= n) return;
    const long long plane = (long long)S * S;
    for (long long p = blockIdx.x * (long long)blockDim.x + threadIdx.x; p < plane;
         p += (long long)gridDim.x * blockDim.x) {
        int y = (int)(p / S), x = (int)(p % S);
        float g, m;
        ct_classifier_pixel(vol, mask, ny, nx, slices[b], S, y, x, lo, hi, &g, &m);
        float* o = out + (long long)b * 3 * plane + p;
        o[0] = g;
        o[plane] = m;
        o[2 * plane] = g * m;
    }
}

extern "C" __global__ void ct_classifier_inputs_i16(const short* vol, const unsigned char* mask, int nz,
                                                    int ny, int nx, const int* slices, int n, int S,
                                                    float lo, float hi, float* out) {
    classifier_body(vol, mask, nz, ny, nx, slices, n, S, lo, hi, out);
}

extern "C" __global__ void ct_classifier_inputs_f32(const float* vol, const unsigned char* mask, int nz,
                                                    int ny, int nx, const int* slices, int n, int S,
                                                    float lo, float hi, float* out) {
    classifier_body(vol, mask, nz, ny, nx, slices, n, S, lo, hi, out);
}
