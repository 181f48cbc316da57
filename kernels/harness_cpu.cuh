// CPU harness: compiled with `g++ -x c++ -O2 -shared -fPIC` into a small shared library (see
// sdk.kernels.harness), never by nvcc. It runs the SAME __host__ __device__ functions the CUDA
// kernels call (ctsdk_common.cuh), with loops standing in for the thread grid, and reproduces the
// device's warp reductions lane by lane (32 partial sums + butterfly), so the kernel arithmetic is
// tested against the NumPy references on every CI run without a GPU.
#include "ctsdk_common.cuh"

#define CT_API extern "C" __attribute__((visibility("default")))

namespace {

template <typename TIn, typename TOut>
void resample3d_loop(const TIn* vol, int nz, int ny, int nx, const double* zc, double dz, double dy,
                     double dx, int oz, int oy, int ox, double z_lo, double z_len, double y_lo,
                     double y_len, double x_lo, double x_len, int mode, float fill, int windowed,
                     float lo, float hi, TOut* out) {
    const ct_axis az = ct_make_axis(nz, oz, dz, zc[0], zc, z_lo, z_len);
    const ct_axis ay = ct_make_axis(ny, oy, dy, 0.5 * dy, 0, y_lo, y_len);
    const ct_axis ax = ct_make_axis(nx, ox, dx, 0.5 * dx, 0, x_lo, x_len);
    long long idx = 0;
    for (int k = 0; k < oz; ++k)
        for (int j = 0; j < oy; ++j)
            for (int i = 0; i < ox; ++i, ++idx) {
                float v = ct_resample_voxel(vol, ny, nx, az, ay, ax, k, j, i, mode, fill);
                if (windowed) v = ct_window(v, lo, hi);
                ct_store(out, idx, v);
            }
}

template <typename TIn>
void classifier_loop(const TIn* vol, const unsigned char* mask, int ny, int nx, const int* slices, int n,
                     int S, float lo, float hi, float* out) {
    const long long plane = (long long)S * S;
    for (int b = 0; b < n; ++b)
        for (int y = 0; y < S; ++y)
            for (int x = 0; x < S; ++x) {
                float g, m;
                ct_classifier_pixel(vol, mask, ny, nx, slices[b], S, y, x, lo, hi, &g, &m);
                float* o = out + (long long)b * 3 * plane + (long long)y * S + x;
                o[0] = g;
                o[plane] = m;
                o[2 * plane] = g * m;
            }
}

template <typename T>
void masked_gap_loop(const T* f, const float* w, int n, int C, int HW, float* out) {
    float lanes[CT_WARP];
    for (long long nc = 0; nc < (long long)n * C; ++nc) {
        const float* wn = w + (nc / C) * HW;
        for (int l = 0; l < CT_WARP; ++l) lanes[l] = ct_gap_partial(f + nc * HW, wn, HW, l, CT_WARP);
        out[nc] = ct_warp_sum_emulated(lanes);
    }
}

}  // namespace

// in_dtype: 0 = int16, 1 = float32; out_half: 0 = float32, 1 = float16 bit patterns.
CT_API int ct_h_resample3d(const void* vol, int in_dtype, int nz, int ny, int nx, const double* zc, double dz,
                           double dy, double dx, int oz, int oy, int ox, double z_lo, double z_len,
                           double y_lo, double y_len, double x_lo, double x_len, int mode, float fill,
                           int windowed, float lo, float hi, int out_half, void* out) {
    if (in_dtype == 0 && !out_half)
        resample3d_loop((const short*)vol, nz, ny, nx, zc, dz, dy, dx, oz, oy, ox, z_lo, z_len, y_lo, y_len,
                        x_lo, x_len, mode, fill, windowed, lo, hi, (float*)out);
    else if (in_dtype == 0)
        resample3d_loop((const short*)vol, nz, ny, nx, zc, dz, dy, dx, oz, oy, ox, z_lo, z_len, y_lo, y_len,
                        x_lo, x_len, mode, fill, windowed, lo, hi, (ct_half*)out);
    else if (in_dtype == 1 && !out_half)
        resample3d_loop((const float*)vol, nz, ny, nx, zc, dz, dy, dx, oz, oy, ox, z_lo, z_len, y_lo, y_len,
                        x_lo, x_len, mode, fill, windowed, lo, hi, (float*)out);
    else if (in_dtype == 1)
        resample3d_loop((const float*)vol, nz, ny, nx, zc, dz, dy, dx, oz, oy, ox, z_lo, z_len, y_lo, y_len,
                        x_lo, x_len, mode, fill, windowed, lo, hi, (ct_half*)out);
    else
        return 1;
    return 0;
}

CT_API int ct_h_classifier_inputs(const void* vol, int in_dtype, const unsigned char* mask, int nz, int ny,
                                  int nx, const int* slices, int n, int S, float lo, float hi, float* out) {
    (void)nz;
    if (in_dtype == 0)
        classifier_loop((const short*)vol, mask, ny, nx, slices, n, S, lo, hi, out);
    else if (in_dtype == 1)
        classifier_loop((const float*)vol, mask, ny, nx, slices, n, S, lo, hi, out);
    else
        return 1;
    return 0;
}

// Mirrors ct_mask_weights block by block (one "block" per sample; warps emulated lane by lane).
CT_API int ct_h_mask_weights(const float* mask, long long sample_stride, int n, int H, int W, int gh, int gw,
                             float* out) {
    const int ncell = gh * gw;
    float* cells = new float[ncell];
    float* smooth = new float[ncell];
    float lanes[CT_WARP];
    for (int b = 0; b < n; ++b) {
        const float* m = mask + b * sample_stride;
        for (int c = 0; c < ncell; ++c) {
            for (int l = 0; l < CT_WARP; ++l)
                lanes[l] = ct_cell_area_partial(m, H, W, gh, gw, c / gw, c % gw, l, CT_WARP);
            cells[c] = ct_warp_sum_emulated(lanes);
        }
        for (int c = 0; c < ncell; ++c) smooth[c] = ct_gauss3(cells, gh, gw, c / gw, c % gw);
        float total = 0.0f;
        for (int c = 0; c < ncell; ++c) total += smooth[c];
        for (int c = 0; c < ncell; ++c) out[(long long)b * ncell + c] = ct_normalise_weight(smooth[c], total, ncell);
    }
    delete[] cells;
    delete[] smooth;
    return 0;
}

// f_half: 0 = float32 features, 1 = float16 bit patterns.
CT_API int ct_h_masked_gap(const void* f, int f_half, const float* w, int n, int C, int HW, float* out) {
    if (f_half)
        masked_gap_loop((const ct_half*)f, w, n, C, HW, out);
    else
        masked_gap_loop((const float*)f, w, n, C, HW, out);
    return 0;
}

CT_API void ct_h_float_to_half(const float* x, long long count, ct_half* y) {
    for (long long i = 0; i < count; ++i) y[i] = ct_float_to_half(x[i]);
}

CT_API void ct_h_half_to_float(const ct_half* x, long long count, float* y) {
    for (long long i = 0; i < count; ++i) y[i] = ct_half_to_float(x[i]);
}
