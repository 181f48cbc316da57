// ctsdk kernel arithmetic: every number the CUDA kernels produce is computed by the functions in
// this header. They are `__host__ __device__`, so the same source compiles three ways:
//   * nvcc / NVRTC (device code, the __global__ wrappers in resample.cu, mask_weights.cu,
//     masked_gap.cu only map threads to outputs and call these);
//   * g++ -x c++ (the CPU harness, harness_cpu.cuh): the CUDA qualifiers are defined away below
//     and half precision is a uint16 bit pattern converted in software with IEEE round-to-nearest-
//     even, bit-identical to the device's cvt.rn.f16.f32 and to NumPy's float16.
// The numeric rules are docs/conventions.md ("Resampling", "HU windowing", "Lung-mask-weighted
// GAP"); the NumPy references are sdk.volume.resample and sdk.pooling.
//
// No standard headers: NVRTC has none by default, so only builtin types are used.
#ifndef CTSDK_COMMON_CUH
#define CTSDK_COMMON_CUH

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#define __host__
#define __device__
#define __forceinline__ inline __attribute__((always_inline))
#define CT_HOST_ONLY 1
#endif

#define CT_FN __host__ __device__ __forceinline__

#define CT_MODE_LINEAR 0
#define CT_MODE_AREA 1
#define CT_EMPTY_MASK_SUM 1e-6f
#define CT_WARP 32

typedef unsigned short ct_half;  // IEEE binary16 bit pattern (storage type on host and device)

// --- small math ------------------------------------------------------------------------------
CT_FN double ct_floor(double x) {
#if defined(__CUDA_ARCH__)
    return floor(x);
#else
    return __builtin_floor(x);
#endif
}
CT_FN double ct_maxd(double a, double b) { return a > b ? a : b; }
CT_FN double ct_mind(double a, double b) { return a < b ? a : b; }
CT_FN int ct_clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
CT_FN float ct_clampf(float v, float lo, float hi) { return v < lo ? lo : (v > hi ? hi : v); }

// --- half <-> float ----------------------------------------------------------------------------
CT_FN float ct_half_to_float(ct_half h) {
#if defined(__CUDA_ARCH__)
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int e = (h >> 10) & 0x1fu;
    unsigned int m = h & 0x3ffu;
    unsigned int bits;
    if (e == 0) {  // zero / subnormal: m * 2^-24, exact in float
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (m << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
#endif
}

CT_FN ct_half ct_float_to_half(float f) {
#if defined(__CUDA_ARCH__)
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    unsigned int x;
    __builtin_memcpy(&x, &f, 4);
    unsigned int sign = (x >> 16) & 0x8000u;
    unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (ct_half)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (ct_half)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax <= 0x33000000u) return (ct_half)sign;             // <= 2^-25 rounds to 0 (tie to even)
    int e = (int)(ax >> 23);
    unsigned int r, rem, half;
    if (e < 113) {  // half subnormal: units of 2^-24
        unsigned int mant = (ax & 0x7fffffu) | 0x800000u;
        int shift = 126 - e;
        r = mant >> shift;
        rem = mant & ((1u << shift) - 1u);
        half = 1u << (shift - 1);
    } else {
        r = ((unsigned int)(e - 112) << 10) | ((ax >> 13) & 0x3ffu);
        rem = ax & 0x1fffu;
        half = 0x1000u;
    }
    if (rem > half || (rem == half && (r & 1u))) r++;  // a carry into the exponent is correct
    return (ct_half)(sign | r);
#endif
}

// value loads / stores for the supported element types
CT_FN float ct_load(const short* p, long long i) { return (float)p[i]; }
CT_FN float ct_load(const float* p, long long i) { return p[i]; }
CT_FN float ct_load(const ct_half* p, long long i) { return ct_half_to_float(p[i]); }
CT_FN void ct_store(float* p, long long i, float v) { p[i] = v; }
CT_FN void ct_store(ct_half* p, long long i, float v) { p[i] = ct_float_to_half(v); }

// --- HU window --------------------------------------------------------------------------------
// clip((v - lo) / (hi - lo), 0, 1)
CT_FN float ct_window(float v, float lo, float hi) { return ct_clampf((v - lo) / (hi - lo), 0.0f, 1.0f); }

// --- one resampling axis ---------------------------------------------------------------------
// Input sample j sits at centres[j] (or c0 + j * spacing when centres is null); its footprint runs
// between the midpoints to its neighbours, the outer ones extending spacing / 2 outwards. The
// output is n_out equal cells over [out_lo, out_lo + out_len], sampled at the cell centres.
struct ct_axis {
    int n_in;
    int n_out;
    double spacing;
    double c0;
    const double* centres;
    double out_lo;
    double out_len;
};

CT_FN ct_axis ct_make_axis(int n_in, int n_out, double spacing, double c0, const double* centres,
                           double out_lo, double out_len) {
    ct_axis a;
    a.n_in = n_in;
    a.n_out = n_out;
    a.spacing = spacing;
    a.c0 = c0;
    a.centres = centres;
    a.out_lo = out_lo;
    a.out_len = out_len;
    return a;
}

// Non-isotropic uniform axis of n_in unit samples (index units; 2D resizes, mask pooling).
CT_FN ct_axis ct_uniform_axis(int n_in, int n_out) {
    return ct_make_axis(n_in, n_out, 1.0, 0.5, 0, 0.0, (double)n_in);
}

CT_FN double ct_centre(const ct_axis& a, int j) { return a.centres ? a.centres[j] : a.c0 + j * a.spacing; }

// footprint edge j in [0, n_in]
CT_FN double ct_edge(const ct_axis& a, int j) {
    if (j <= 0) return ct_centre(a, 0) - 0.5 * a.spacing;
    if (j >= a.n_in) return ct_centre(a, a.n_in - 1) + 0.5 * a.spacing;
    if (!a.centres) return a.c0 + (j - 0.5) * a.spacing;
    return 0.5 * (a.centres[j - 1] + a.centres[j]);
}

CT_FN double ct_out_lo(const ct_axis& a, int k) { return a.out_lo + k * a.out_len / a.n_out; }
CT_FN double ct_out_centre(const ct_axis& a, int k) { return a.out_lo + (k + 0.5) * a.out_len / a.n_out; }

// Linear interpolation taps of output sample k: value = (1 - f) * x[i0] + f * x[i1]; `outside`
// when the cell centre lies outside the input extent (then the value is fill).
struct ct_lin {
    int i0;
    int i1;
    float f;
    double u;  // clamped source coordinate (index units)
    bool outside;
};

CT_FN ct_lin ct_axis_linear(const ct_axis& a, int k) {
    double t = ct_out_centre(a, k);
    ct_lin r;
    r.outside = t < ct_edge(a, 0) || t > ct_edge(a, a.n_in);
    double u;
    int n = a.n_in;
    if (!a.centres) {
        u = (t - a.c0) / a.spacing;
        u = u < 0.0 ? 0.0 : (u > n - 1 ? (double)(n - 1) : u);
    } else if (t <= a.centres[0]) {  // np.interp semantics: clamp at both ends
        u = 0.0;
    } else if (t >= a.centres[n - 1]) {
        u = (double)(n - 1);
    } else {
        int lo = 0, hi = n - 1;  // centres[lo] <= t < centres[hi]
        while (hi - lo > 1) {
            int mid = (lo + hi) >> 1;
            if (a.centres[mid] <= t) lo = mid; else hi = mid;
        }
        u = lo + (t - a.centres[lo]) / (a.centres[hi] - a.centres[lo]);
    }
    r.u = u;
    r.i0 = ct_clampi((int)ct_floor(u), 0, n - 1);
    r.i1 = r.i0 + 1 < n ? r.i0 + 1 : n - 1;
    r.f = (float)(u - r.i0);
    return r;
}

// Nearest source index (floor(u + 0.5) of the clamped source coordinate; torch nearest-exact).
CT_FN int ct_axis_nearest(const ct_axis& a, int k) {
    ct_lin l = ct_axis_linear(a, k);
    return ct_clampi((int)ct_floor(l.u + 0.5), 0, a.n_in - 1);
}

// Area rule: output cell k = [lo, hi); input j contributes overlap(j) / (hi - lo).
CT_FN int ct_axis_first(const ct_axis& a, double lo) {
    int n = a.n_in;
    if (!a.centres) return ct_clampi((int)ct_floor((lo - ct_edge(a, 0)) / a.spacing), 0, n - 1);
    if (lo < ct_edge(a, 1)) return 0;
    int l = 1, h = n;  // largest j with edge(j) <= lo
    while (h - l > 1) {
        int mid = (l + h) >> 1;
        if (ct_edge(a, mid) <= lo) l = mid; else h = mid;
    }
    return ct_clampi(l, 0, n - 1);
}

CT_FN double ct_area_weight(const ct_axis& a, int j, double lo, double hi) {
    double w = ct_mind(ct_edge(a, j + 1), hi) - ct_maxd(ct_edge(a, j), lo);
    return w > 0.0 ? w / (hi - lo) : 0.0;
}

// fraction of cell [lo, hi) outside the input extent
CT_FN double ct_area_fill(const ct_axis& a, double lo, double hi) {
    return (ct_maxd(0.0, ct_mind(hi, ct_edge(a, 0)) - lo) + ct_maxd(0.0, hi - ct_maxd(lo, ct_edge(a, a.n_in)))) /
           (hi - lo);
}

// --- 3D resample: one output voxel -----------------------------------------------------------
template <typename TIn>
CT_FN float ct_resample_voxel(const TIn* vol, int ny, int nx, const ct_axis& az, const ct_axis& ay,
                              const ct_axis& ax, int k, int j, int i, int mode, float fill) {
    const long long sy = nx, sz = (long long)ny * nx;
    if (mode == CT_MODE_LINEAR) {
        ct_lin lz = ct_axis_linear(az, k), ly = ct_axis_linear(ay, j), lx = ct_axis_linear(ax, i);
        if (lz.outside || ly.outside || lx.outside) return fill;
        const long long z0 = lz.i0 * sz, z1 = lz.i1 * sz, y0 = ly.i0 * sy, y1 = ly.i1 * sy;
        float gx = lx.f, hx = 1.0f - lx.f;
        float v00 = hx * ct_load(vol, z0 + y0 + lx.i0) + gx * ct_load(vol, z0 + y0 + lx.i1);
        float v01 = hx * ct_load(vol, z0 + y1 + lx.i0) + gx * ct_load(vol, z0 + y1 + lx.i1);
        float v10 = hx * ct_load(vol, z1 + y0 + lx.i0) + gx * ct_load(vol, z1 + y0 + lx.i1);
        float v11 = hx * ct_load(vol, z1 + y1 + lx.i0) + gx * ct_load(vol, z1 + y1 + lx.i1);
        float v0 = (1.0f - ly.f) * v00 + ly.f * v01;
        float v1 = (1.0f - ly.f) * v10 + ly.f * v11;
        return (1.0f - lz.f) * v0 + lz.f * v1;
    }
    // area: exact box average of the piecewise-constant input, fill outside the extent
    double zlo = ct_out_lo(az, k), zhi = ct_out_lo(az, k + 1);
    double ylo = ct_out_lo(ay, j), yhi = ct_out_lo(ay, j + 1);
    double xlo = ct_out_lo(ax, i), xhi = ct_out_lo(ax, i + 1);
    int jz0 = ct_axis_first(az, zlo), jy0 = ct_axis_first(ay, ylo), jx0 = ct_axis_first(ax, xlo);
    float acc = 0.0f;
    for (int jz = jz0; jz < az.n_in && ct_edge(az, jz) < zhi; ++jz) {
        float wz = (float)ct_area_weight(az, jz, zlo, zhi);
        if (wz == 0.0f) continue;
        float accy = 0.0f;
        for (int jy = jy0; jy < ay.n_in && ct_edge(ay, jy) < yhi; ++jy) {
            float wy = (float)ct_area_weight(ay, jy, ylo, yhi);
            if (wy == 0.0f) continue;
            const long long row = jz * sz + jy * sy;
            float accx = 0.0f;
            for (int jx = jx0; jx < ax.n_in && ct_edge(ax, jx) < xhi; ++jx) {
                accx += (float)ct_area_weight(ax, jx, xlo, xhi) * ct_load(vol, row + jx);
            }
            accy += wy * accx;
        }
        acc += wz * accy;
    }
    double inside = (1.0 - ct_area_fill(az, zlo, zhi)) * (1.0 - ct_area_fill(ay, ylo, yhi)) *
                    (1.0 - ct_area_fill(ax, xlo, xhi));
    if (inside < 1.0) acc += (float)(1.0 - inside) * fill;
    return acc;
}

// --- 2D classifier input: one output pixel, 3 channels -------------------------------------------
// out (N, 3, S, S): grey = window(bilinear HU), mask = nearest (0/1), grey * mask.
template <typename TIn>
CT_FN void ct_classifier_pixel(const TIn* vol, const unsigned char* mask, int ny, int nx, int slice,
                               int S, int y, int x, float lo, float hi, float* g, float* m) {
    ct_axis ay = ct_uniform_axis(ny, S), ax = ct_uniform_axis(nx, S);
    ct_lin ly = ct_axis_linear(ay, y), lx = ct_axis_linear(ax, x);
    const long long base = (long long)slice * ny * nx;
    const long long r0 = base + (long long)ly.i0 * nx, r1 = base + (long long)ly.i1 * nx;
    float gx = lx.f, hx = 1.0f - lx.f;
    float v0 = hx * ct_load(vol, r0 + lx.i0) + gx * ct_load(vol, r0 + lx.i1);
    float v1 = hx * ct_load(vol, r1 + lx.i0) + gx * ct_load(vol, r1 + lx.i1);
    *g = ct_window((1.0f - ly.f) * v0 + ly.f * v1, lo, hi);
    int my = ct_clampi((int)ct_floor(ly.u + 0.5), 0, ny - 1);
    int mx = ct_clampi((int)ct_floor(lx.u + 0.5), 0, nx - 1);
    *m = mask[base + (long long)my * nx + mx] != 0 ? 1.0f : 0.0f;
}

// --- mask weights ----------------------------------------------------------------------------
// Area average of grid cell (cy, cx) of an H x W mask: lane `lane` of `nlanes` sums the footprint
// pixels p = lane, lane + nlanes, ... (row-major over the footprint, so a warp reads along rows);
// the caller adds the lanes' partial sums.
CT_FN float ct_cell_area_partial(const float* m, int H, int W, int gh, int gw, int cy, int cx,
                                 int lane, int nlanes) {
    ct_axis ay = ct_uniform_axis(H, gh), ax = ct_uniform_axis(W, gw);
    double ylo = ct_out_lo(ay, cy), yhi = ct_out_lo(ay, cy + 1);
    double xlo = ct_out_lo(ax, cx), xhi = ct_out_lo(ax, cx + 1);
    int y0 = ct_axis_first(ay, ylo), x0 = ct_axis_first(ax, xlo);
    int y1 = y0, x1 = x0;  // one past the last footprint row / column
    while (y1 < H && ct_edge(ay, y1) < yhi) ++y1;
    while (x1 < W && ct_edge(ax, x1) < xhi) ++x1;
    int fw = x1 - x0, count = (y1 - y0) * fw;
    float acc = 0.0f;
    for (int p = lane; p < count; p += nlanes) {
        int r = y0 + p / fw, c = x0 + p % fw;
        float w = (float)(ct_area_weight(ay, r, ylo, yhi) * ct_area_weight(ax, c, xlo, xhi));
        acc += w * m[(long long)r * W + c];
    }
    return acc;
}

// 3x3 Gaussian (sigma 1, normalised to sum 1) at (y, x) of a gh x gw grid, zero padding.
CT_FN float ct_gauss3(const float* cells, int gh, int gw, int y, int x) {
    const double e1 = 0.60653065971263342360, e2 = 0.36787944117144233402;  // exp(-1/2), exp(-1)
    const double norm = 1.0 + 4.0 * e1 + 4.0 * e2;
    float acc = 0.0f;
    for (int dy = -1; dy <= 1; ++dy) {
        int yy = y + dy;
        if (yy < 0 || yy >= gh) continue;
        for (int dx = -1; dx <= 1; ++dx) {
            int xx = x + dx;
            if (xx < 0 || xx >= gw) continue;
            int d2 = dx * dx + dy * dy;
            float g = (float)((d2 == 0 ? 1.0 : (d2 == 1 ? e1 : e2)) / norm);
            acc += g * cells[yy * gw + xx];
        }
    }
    return acc;
}

// Final weight of a cell from its smoothed value and the grid total (uniform when empty).
CT_FN float ct_normalise_weight(float smoothed, float total, int cells) {
    return total < CT_EMPTY_MASK_SUM ? 1.0f / (float)cells : smoothed / total;
}

// --- masked GAP ------------------------------------------------------------------------------
// One (n, c): lane `lane` of `nlanes` sums f[hw] * w[hw] for hw = lane, lane + nlanes, ...
template <typename T>
CT_FN float ct_gap_partial(const T* f, const float* w, int hw, int lane, int nlanes) {
    float acc = 0.0f;
    for (int p = lane; p < hw; p += nlanes) acc += ct_load(f, p) * w[p];
    return acc;
}

// Butterfly (xor) sum of 32 lane values, in the order __shfl_xor_sync produces; used by the CPU
// harness to reproduce the device's reduction order exactly.
CT_FN float ct_warp_sum_emulated(float* v) {
    float tmp[CT_WARP];
    for (int off = CT_WARP / 2; off > 0; off >>= 1) {
        for (int l = 0; l < CT_WARP; ++l) tmp[l] = v[l] + v[l ^ off];
        for (int l = 0; l < CT_WARP; ++l) v[l] = tmp[l];
    }
    return v[0];
}

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// Sum over the 32 lanes of a full warp (every lane gets the total).
__device__ __forceinline__ float ct_warp_sum(float v) {
#if defined(__CUDA_ARCH__)
    for (int off = CT_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
#endif
    return v;
}
#endif

#endif  // CTSDK_COMMON_CUH
