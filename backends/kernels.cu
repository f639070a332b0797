// streamgraph's CUDA kernels, compiled with NVRTC by backends/cupy_backend.py.
//
// Storage types: float, half_t (IEEE fp16), bf16_t (bfloat16). Every kernel loads its inputs
// as float, computes in float and stores in the output's type (round to nearest even), the
// same contract as the NumPy backend. No headers: fp16 goes through PTX conversions, bf16
// through bit operations, so the source compiles anywhere NVRTC runs.

typedef long long i64;
struct half_t { unsigned short x; };
struct bf16_t { unsigned short x; };

// Programmatic dependent launch (Hopper and later): a kernel lets the next one start as soon as
// all of its blocks run (PDL_LAUNCH), and waits for the previous one to finish, its writes
// visible, before touching anything that kernel may write or read (PDL_WAIT). Work before the
// wait may only read what no kernel writes: the weights. On older GPUs both are no-ops (and
// the backend launches without the attribute).
#ifndef PDL_TRIGGER_AT_START  // 0: dependents launch as this kernel's blocks exit
#define PDL_TRIGGER_AT_START 0
#endif
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define PDL_TRIGGER()
#define PDL_WAIT()
#endif
#if PDL_TRIGGER_AT_START
#define PDL_LAUNCH() PDL_TRIGGER()
#else
#define PDL_LAUNCH()
#endif
#define PDL_ENTRY() \
    PDL_LAUNCH();   \
    PDL_WAIT()
// PDL_TRIGGER_LATE (the backend's pdl_trigger_late): the matrix-vector kernels let their
// dependents launch once a block has issued its last weight loads (at a point uniform over the
// block in k_matvec, k_matvec_q and k_matvec_q16; per warp in k_matvec_qs, where the first
// warp to call it triggers the block), so a dependent's blocks can take an SM as soon as one
// is freed and start their own weight loads while this kernel's last blocks finish. 0:
// dependents launch when every block has exited.
#ifndef PDL_TRIGGER_LATE
#define PDL_TRIGGER_LATE 0
#endif
// the experiment switches (kernels.cu, quant_blocks.cuh, quant_kernels.cu) are tested by value,
// so -DNAME turns one on and -DNAME=0 off
#ifndef MV_LOAD_NC
#define MV_LOAD_NC 0
#endif
#ifndef DT_SKIP_PV
#define DT_SKIP_PV 0
#endif
#ifndef DT_SKIP_MERGE
#define DT_SKIP_MERGE 0
#endif
#ifndef QLOAD_SHORTS
#define QLOAD_SHORTS 0
#endif
#ifndef Q4K_CLASSIC
#define Q4K_CLASSIC 0
#endif
#if PDL_TRIGGER_LATE
#define PDL_LATE() PDL_TRIGGER()
#else
#define PDL_LATE()
#endif

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float h2f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float b2f(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ unsigned short f2b(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ float ld(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, i64 i) { return h2f(p[i].x); }
__device__ __forceinline__ float ld(const bf16_t* p, i64 i) { return b2f(p[i].x); }
__device__ __forceinline__ void st(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, i64 i, float v) { p[i].x = f2h(v); }
__device__ __forceinline__ void st(bf16_t* p, i64 i, float v) { p[i].x = f2b(v); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float silu(float x) { return 0.5f * x * (1.0f + tanhf(0.5f * x)); }

// ---- elementwise, any strides and broadcasting ---------------------------------------------
// meta: [nd, shape[6], stride_a[6], stride_b[6]] in elements; the output is contiguous.
#define MAXD 6

__device__ __forceinline__ void offsets(const i64* meta, i64 i, i64& ia, i64& ib) {
    int nd = (int)meta[0];
    ia = 0;
    ib = 0;
    for (int d = nd - 1; d >= 0; --d) {
        i64 s = meta[1 + d];
        i64 c = i % s;
        i /= s;
        ia += c * meta[1 + MAXD + d];
        ib += c * meta[1 + 2 * MAXD + d];
    }
}

// OP: 0 copy, 1 scale
template <typename TA, typename TO, int OP>
__global__ void k_unary(const TA* a, TO* out, i64 n, const i64* meta, float s) {
    PDL_ENTRY();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 ia, ib;
        offsets(meta, i, ia, ib);
        float x = ld(a, ia);
        st(out, i, OP == 1 ? x * s : x);
    }
}

// OP: 0 add, 1 mul, 2 geglu, 3 swiglu
template <typename TA, typename TB, typename TO, int OP>
__global__ void k_binary(const TA* a, const TB* b, TO* out, i64 n, const i64* meta) {
    PDL_ENTRY();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 ia, ib;
        offsets(meta, i, ia, ib);
        float x = ld(a, ia), y = ld(b, ib), v;
        if (OP == 0) v = x + y;
        else if (OP == 1) v = x * y;
        else if (OP == 2) v = gelu_tanh(x) * y;
        else v = silu(x) * y;
        st(out, i, v);
    }
}

// ---- rows ----------------------------------------------------------------------------------
template <typename TT>
__global__ void k_get_rows(const TT* table, const int* idx, float* out, i64 n, i64 row, i64 n_table) {
    PDL_ENTRY();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * row; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / row, c = i - r * row;
        const i64 t = idx[r];  // out of range: NaN, visibly wrong instead of a fault
        out[i] = (t >= 0 && t < n_table) ? ld(table, t * row + c) : __int_as_float(0x7fc00000);
    }
}

template <typename TS, typename TD>
__global__ void k_set_rows(const TS* src, const int* idx, TD* dst, i64 n, i64 row, i64 n_dst) {
    PDL_ENTRY();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n * row; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / row, c = i - r * row;
        const i64 t = idx[r];  // out of range: skipped, never a write outside the cache
        if (t >= 0 && t < n_dst) st(dst, t * row + c, ld(src, i));
    }
}

// ---- rms norm: one block per row -------------------------------------------------------------
template <typename TX, typename TW, typename TR, typename TO>
__global__ void k_rms_norm(const TX* x, const TW* w, const TR* res, TO* out, int D, float eps,
                           int has_w, int has_res) {
    PDL_ENTRY();
    __shared__ float part[32];
    const i64 base = (i64)blockIdx.x * D;
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = ld(x, base + d);
        ss += v * v;
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.f;
        t = warp_sum(t);
        if (threadIdx.x == 0) part[0] = t;
    }
    __syncthreads();
    const float r = rsqrtf(part[0] / D + eps);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float v = ld(x, base + d) * r;
        if (has_w) v *= ld(w, d);
        if (has_res) v += ld(res, base + d);
        st(out, base + d, v);
    }
}

// ---- rope: one thread per element of (n, H, D) ---------------------------------------------
template <typename TX, typename TO>
__global__ void k_rope(const TX* x, const int* pos, TO* out, i64 total, int H, int D, int n_dims,
                       int neox, double base, double freq_scale) {
    PDL_ENTRY();
    for (i64 e = blockIdx.x * (i64)blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const int d = (int)(e % D);
        const i64 row = e - d;  // start of this head's vector
        const int t = (int)(e / ((i64)H * D));
        if (d >= n_dims) {
            st(out, e, ld(x, e));
            continue;
        }
        const int half = n_dims / 2;
        int i, d0, d1;
        bool first;
        if (neox) {
            i = d % half;
            d0 = i;
            d1 = i + half;
            first = d < half;
        } else {
            i = d / 2;
            d0 = 2 * i;
            d1 = 2 * i + 1;
            first = (d & 1) == 0;
        }
        const double theta = (double)pos[t] * freq_scale * pow(base, -2.0 * i / n_dims);
        double sn, cs;
        sincos(theta, &sn, &cs);
        const float c = (float)cs, s = (float)sn;
        const float x0 = ld(x, row + d0), x1 = ld(x, row + d1);
        st(out, e, first ? x0 * c - x1 * s : x0 * s + x1 * c);
    }
}

// ---- attention: online softmax over key batches, query heads of one kv head together -------
// grid (n * Hk * groups, splits), AW warps per block. A block takes one query token, one kv
// head and up to GB of the query heads that share it (grouped-query attention), so each K and
// V row is loaded once for all of them. Each warp takes KB consecutive keys at a time (their
// rows load together instead of one dependent load after another); warps interleave by KB
// inside the block's share of keys. One split: the block writes the normalised result;
// several: (max, sum, acc) partials per query head that k_attn_combine merges.
#define AW 4
#define KB 8
#define GB 4
#define DMAX 256
#define DPL (DMAX / 32)

__device__ __forceinline__ bool visible(int kp, int qp, int window) {
    return kp >= 0 && kp <= qp && (window == 0 || qp - kp < window);
}

template <typename TQ, typename TK, typename TV>
__global__ void k_attention(const TQ* q, const TK* k, const TV* v, const int* qpos, const int* kpos,
                            float* out, float* part, int H, int Hk, int m, int D, int Dv, float scale,
                            int window, int chunk, int prefix) {
    PDL_ENTRY();
    __shared__ float smax[AW][GB], ssum[AW][GB];
    __shared__ float sacc[AW][GB][DMAX];
    const int G = H / Hk, groups = (G + GB - 1) / GB;
    const int row = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int i = row / (Hk * groups), rest = row - i * Hk * groups;
    const int hk = rest / groups, h0 = hk * G + (rest - hk * groups) * GB;
    const int nh = min(GB, hk * G + G - h0);  // query heads handled here
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qr[GB][DPL], acc[GB][DPL];
#pragma unroll
    for (int g = 0; g < GB; ++g)
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
            const int d = lane + 32 * t;
            qr[g][t] = (g < nh && d < D) ? ld(q, ((i64)i * H + h0 + g) * D + d) : 0.f;
            acc[g][t] = 0.f;
        }
    float mx[GB], sum[GB];
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        mx[g] = neg_inf();
        sum[g] = 0.f;
    }
    const int qp = qpos[i];
    if (prefix) {  // AttentionParams.prefix_rows: rows 0..qp shared by the splits (k_attn_decode)
        m = max(0, min(m, qp + 1));
        chunk = (m + splits - 1) / splits;
    }
    const int j0 = split * chunk, j1 = min(m, j0 + chunk);
    for (int jb = j0 + warp * KB; jb < j1; jb += AW * KB) {
        bool vis[KB];
        bool any = false;
#pragma unroll
        for (int b = 0; b < KB; ++b) {
            const int j = jb + b;
            vis[b] = j < j1 && visible(kpos[j], qp, window);
            any |= vis[b];
        }
        if (!any) continue;
        float s[GB][KB];
#pragma unroll
        for (int g = 0; g < GB; ++g)
#pragma unroll
            for (int b = 0; b < KB; ++b) s[g][b] = 0.f;
        float rows[KB][DPL];  // all loads of the batch issued before any use
#pragma unroll
        for (int b = 0; b < KB; ++b)
#pragma unroll
            for (int t = 0; t < DPL; ++t) {
                const int d = lane + 32 * t;
                rows[b][t] = (vis[b] && d < D) ? ld(k, ((i64)(jb + b) * Hk + hk) * D + d) : 0.f;
            }
#pragma unroll
        for (int b = 0; b < KB; ++b)
#pragma unroll
            for (int t = 0; t < DPL; ++t)
#pragma unroll
                for (int g = 0; g < GB; ++g) s[g][b] += qr[g][t] * rows[b][t];
#pragma unroll
        for (int g = 0; g < GB; ++g) {
            if (g >= nh) break;
            float bm = neg_inf();
#pragma unroll
            for (int b = 0; b < KB; ++b) {
                s[g][b] = vis[b] ? warp_sum(s[g][b]) * scale : neg_inf();
                bm = fmaxf(bm, s[g][b]);
            }
            const float nm = fmaxf(mx[g], bm);
            const float c = expf(mx[g] - nm);  // 0 while mx is -inf
            sum[g] *= c;
#pragma unroll
            for (int t = 0; t < DPL; ++t) acc[g][t] *= c;
#pragma unroll
            for (int b = 0; b < KB; ++b) {
                s[g][b] = vis[b] ? expf(s[g][b] - nm) : 0.f;
                sum[g] += s[g][b];
            }
            mx[g] = nm;
        }
#pragma unroll
        for (int b = 0; b < KB; ++b)
#pragma unroll
            for (int t = 0; t < DPL; ++t) {
                const int d = lane + 32 * t;
                rows[b][t] = (vis[b] && d < Dv) ? ld(v, ((i64)(jb + b) * Hk + hk) * Dv + d) : 0.f;
            }
#pragma unroll
        for (int b = 0; b < KB; ++b)
#pragma unroll
            for (int t = 0; t < DPL; ++t)
#pragma unroll
                for (int g = 0; g < GB; ++g) acc[g][t] += s[g][b] * rows[b][t];
    }
#pragma unroll
    for (int g = 0; g < GB; ++g) {
        if (lane == 0) {
            smax[warp][g] = mx[g];
            ssum[warp][g] = sum[g];
        }
#pragma unroll
        for (int t = 0; t < DPL; ++t) {
            const int d = lane + 32 * t;
            if (d < Dv) sacc[warp][g][d] = acc[g][t];
        }
    }
    __syncthreads();
    for (int g = 0; g < nh; ++g) {
        const int ih = i * H + h0 + g;
        float M = neg_inf();
        for (int w = 0; w < AW; ++w) M = fmaxf(M, smax[w][g]);
        float S = 0.f;
        for (int w = 0; w < AW; ++w)
            if (smax[w][g] != neg_inf()) S += ssum[w][g] * expf(smax[w][g] - M);
        for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
            float o = 0.f;
            for (int w = 0; w < AW; ++w)
                if (smax[w][g] != neg_inf()) o += sacc[w][g][d] * expf(smax[w][g] - M);
            if (splits == 1) {
                out[(i64)ih * Dv + d] = S > 0.f ? o / S : 0.f;
            } else {
                part[((i64)ih * splits + split) * (Dv + 2) + 2 + d] = o;
            }
        }
        if (splits > 1 && threadIdx.x == 0) {
            part[((i64)ih * splits + split) * (Dv + 2)] = M;
            part[((i64)ih * splits + split) * (Dv + 2) + 1] = S;
        }
    }
}

// Merge the splits' partials of one query head: per-split weights exp(max_s - max) computed
// once by one warp, then every thread sums its output dims over the splits.
#define MAX_SPLITS 1024

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__global__ void k_attn_combine(const float* part, float* out, int splits, int Dv) {
    PDL_ENTRY();
    __shared__ float weight[MAX_SPLITS];
    __shared__ float total;
    const int ih = blockIdx.x, lane = threadIdx.x & 31;
    const float* p = part + (i64)ih * splits * (Dv + 2);
    if (threadIdx.x < 32) {
        float M = neg_inf();
        for (int s = lane; s < splits; s += 32) M = fmaxf(M, p[(i64)s * (Dv + 2)]);
        M = warp_max(M);
        float S = 0.f;
        for (int s = lane; s < splits; s += 32) {
            const float ms = p[(i64)s * (Dv + 2)];
            const float w = ms == neg_inf() ? 0.f : expf(ms - M);
            weight[s] = w;
            S += p[(i64)s * (Dv + 2) + 1] * w;
        }
        S = warp_sum(S);
        if (lane == 0) total = S;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < Dv; d += blockDim.x) {
        float o = 0.f;
#pragma unroll 8
        for (int s = 0; s < splits; ++s) o += p[(i64)s * (Dv + 2) + 2 + d] * weight[s];
        out[(i64)ih * Dv + d] = total > 0.f ? o / total : 0.f;
    }
}

// ---- matrix-vector products for few rows (decode): one warp per output column --------------
// out (M, N) f32 = x (M, K) f32 @ w (N, K)^T. 16-byte loads of w when K allows.
__device__ __forceinline__ void unpack(const float* p, float* f) {
    float4 u = *reinterpret_cast<const float4*>(p);
    f[0] = u.x; f[1] = u.y; f[2] = u.z; f[3] = u.w;
}
__device__ __forceinline__ void unpack(const half_t* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = h2f((unsigned short)(w[e] & 0xffffu));
        f[2 * e + 1] = h2f((unsigned short)(w[e] >> 16));
    }
}
__device__ __forceinline__ void unpack(const bf16_t* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = __uint_as_float(w[e] << 16);
        f[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
    }
}
template <typename T> struct VecOf { static const int n = 8; };
template <> struct VecOf<float> { static const int n = 4; };

#define GEMV_WARPS 8
#define GEMV_MAXM 8

template <int V>
__device__ __forceinline__ float dotv(const float* f, const float* xp) {
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < V; e += 4) {
        const float4 xv = *reinterpret_cast<const float4*>(xp + e);
        s += f[e] * xv.x + f[e + 1] * xv.y + f[e + 2] * xv.z + f[e + 3] * xv.w;
    }
    return s;
}

// WPR warps share one output row (split K) when rows are too few to fill the GPU.
template <typename TW, int WPR>
__global__ void k_gemv(const TW* w, const float* x, float* out, int M, int N, int K, int vec_ok) {
    PDL_ENTRY();
    __shared__ float red[GEMV_WARPS][GEMV_MAXM];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (GEMV_WARPS / WPR) + warp / WPR;
    const int part = warp % WPR;
    const bool live = n < N;
    float acc[GEMV_MAXM];
#pragma unroll
    for (int r = 0; r < GEMV_MAXM; ++r) acc[r] = 0.f;
    const int V = VecOf<TW>::n;
    if (live) {
        const TW* row = w + (i64)n * K;
        if (vec_ok) {
            // four 16-byte weight loads in flight per lane before any is used, x in float4s
            const int step = WPR * 32 * V;
            int k0 = (part * 32 + lane) * V;
            for (; k0 + 3 * step < K; k0 += 4 * step) {
                float f[4][8];
#pragma unroll
                for (int u = 0; u < 4; ++u) unpack(row + k0 + u * step, f[u]);
#pragma unroll
                for (int r = 0; r < GEMV_MAXM; ++r)
                    if (r < M)
#pragma unroll
                        for (int u = 0; u < 4; ++u) acc[r] += dotv<V>(f[u], x + (i64)r * K + k0 + u * step);
            }
            for (; k0 < K; k0 += step) {
                float f[8];
                unpack(row + k0, f);
#pragma unroll
                for (int r = 0; r < GEMV_MAXM; ++r)
                    if (r < M) acc[r] += dotv<V>(f, x + (i64)r * K + k0);
            }
        } else {
            for (int k = part * 32 + lane; k < K; k += WPR * 32) {
                const float wk = ld(row, k);
#pragma unroll
                for (int r = 0; r < GEMV_MAXM; ++r)
                    if (r < M) acc[r] += wk * x[(i64)r * K + k];
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAXM; ++r) {
        if (r < M) {
            const float s = warp_sum(acc[r]);
            if (WPR == 1) {
                if (lane == 0 && live) out[(i64)r * N + n] = s;
            } else if (lane == 0) {
                red[warp][r] = s;
            }
        }
    }
    if (WPR > 1) {
        __syncthreads();
        if (part == 0 && lane < M && live) {
            float t = 0.f;
            for (int p = 0; p < WPR; ++p) t += red[warp + p][lane];
            out[(i64)lane * N + n] = t;
        }
    }
}

// ---- generated weights: a counter-based normal draw, the same on every run ------------------
__device__ __forceinline__ unsigned long long splitmix(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <typename TO>
__global__ void k_fill_normal(TO* out, i64 n, unsigned long long seed, float mean, float std) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const unsigned long long r = splitmix(seed ^ splitmix((unsigned long long)i));
        const float u1 = ((r >> 40) + 1) * (1.0f / 16777217.0f);          // (0, 1]
        const float u2 = ((r & 0xffffffull) >> 0) * (1.0f / 16777216.0f);  // [0, 1)
        const float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        st(out, i, mean + std * z);
    }
}

// ---- matrix-vector products from a built input vector (decode) ------------------------------
// out (M, N) f32 = u (M, K) @ w (N, K)^T, M <= 8, where the block first builds u in shared
// memory from its inputs:
//   PRE 0: u = rms(a) * w2            PRE 1: v = rms(a) * w1 + b, u = rms(v) * w2
//   PRE 2: v = a + b, u = rms(v) * w2 PRE 3: u = gelu(a) * b     PRE 4: u = silu(a) * b
//   PRE 5: u = a
// Where v_out is given, block 0 also writes v there (another node reads it).
// Each warp owns R rows and each lane up to 16 / R 16-byte pieces of each, all loaded before
// any is used: short rows (K = 640) still keep enough bytes in flight to stream the matrix at
// memory speed. The first rows' loads are issued before the prologue, hiding its latency.
// The prologue loads all of a thread's inputs in one round trip (PRE_REGS per thread held in
// registers; longer rows read again from cache). MV_WARPS: warps per block (the backend's
// matvec_warps defines it): each block builds the whole input in shared memory, so fewer,
// larger blocks move less of it from L2; 16 ran every measured shape fastest (NOTES.md).
#ifndef MV_WARPS
#define MV_WARPS 16
#endif
// PRE_REGS: 1,024 input elements a block in one round trip at 4 warps and more (8 a thread at
// 4 warps, 2 at 16, where 8 would not fit 128 registers beside the weights' 64)
#define PRE_REGS (MV_WARPS >= 4 ? 32 / MV_WARPS : 8)

__device__ __forceinline__ float block_sum(float v, float* red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    v = warp_sum(v);
    __syncthreads();  // an earlier call may still be reading red
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return warp_sum(lane < (int)(blockDim.x >> 5) ? red[lane] : 0.f);
}

__device__ __forceinline__ void cvt8(const uint4& u, const float*, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void cvt8(const uint4& u, const half_t*, float* f) {
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = h2f((unsigned short)(w[e] & 0xffffu));
        f[2 * e + 1] = h2f((unsigned short)(w[e] >> 16));
    }
}
__device__ __forceinline__ void cvt8(const uint4& u, const bf16_t*, float* f) {
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        f[2 * e] = __uint_as_float(w[e] << 16);
        f[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
    }
}

// SW: element k of a row is stored at xs_index<SW>(k) (see k_matvec_q)
template <bool SW>
__device__ __forceinline__ int xs_index(int k) {
    return SW ? ((k & ~31) | ((((k >> 2) ^ (k >> 5)) & 7) << 2) | (k & 3)) : k;
}

template <int PRE, bool SW = false>
__device__ __forceinline__ void build_input(float* xs, const float* a, const float* b,
                                            const float* w1, const float* w2, float* v_out,
                                            int M, int K, i64 a_rs, i64 b_rs, float eps1,
                                            float eps2, float* red) {
    const int tid = threadIdx.x, nt = blockDim.x;
    const bool write_v = v_out != nullptr && blockIdx.x == 0;
    for (int r = 0; r < M; ++r) {
        float* x = xs + (i64)r * K;
        const float* ar = a + r * a_rs;
        const float* br = b + r * b_rs;
        if (PRE >= 3) {
            for (int k = tid; k < K; k += nt) {
                const float g = ar[k];
                x[xs_index<SW>(k)] = PRE == 5 ? g : (PRE == 3 ? gelu_tanh(g) : silu(g)) * br[k];
            }
            continue;
        }
        // one round trip: every input element this thread needs, loaded together
        float av[PRE_REGS], bv[PRE_REGS], w1v[PRE_REGS], w2v[PRE_REGS];
#pragma unroll
        for (int e = 0; e < PRE_REGS; ++e) {
            const int k = tid + e * nt;
            const bool in = k < K;
            av[e] = in ? ar[k] : 0.f;
            bv[e] = (in && PRE >= 1) ? br[k] : 0.f;
            w1v[e] = (in && PRE == 1) ? w1[k] : 0.f;
            w2v[e] = in ? w2[k] : 0.f;
        }
        float ss = 0.f;
        if (PRE == 1) {
#pragma unroll
            for (int e = 0; e < PRE_REGS; ++e) ss += av[e] * av[e];
            for (int k = tid + PRE_REGS * nt; k < K; k += nt) ss += ar[k] * ar[k];
            const float s1 = rsqrtf(block_sum(ss, red) / K + eps1);
            ss = 0.f;
#pragma unroll
            for (int e = 0; e < PRE_REGS; ++e) {
                const int k = tid + e * nt;
                if (k < K) {
                    const float v = av[e] * s1 * w1v[e] + bv[e];
                    av[e] = v;
                    ss += v * v;
                }
            }
            for (int k = tid + PRE_REGS * nt; k < K; k += nt) {
                const float v = ar[k] * s1 * w1[k] + br[k];
                x[xs_index<SW>(k)] = v;
                ss += v * v;
            }
        } else {
#pragma unroll
            for (int e = 0; e < PRE_REGS; ++e) {
                if (PRE == 2) av[e] += bv[e];
                ss += av[e] * av[e];
            }
            for (int k = tid + PRE_REGS * nt; k < K; k += nt) {
                const float v = PRE == 2 ? ar[k] + br[k] : ar[k];
                x[xs_index<SW>(k)] = v;
                ss += v * v;
            }
        }
        const float s2 = rsqrtf(block_sum(ss, red) / K + eps2);
#pragma unroll
        for (int e = 0; e < PRE_REGS; ++e) {
            const int k = tid + e * nt;
            if (k < K) {
                if (PRE >= 1 && write_v) v_out[(i64)r * K + k] = av[e];
                x[xs_index<SW>(k)] = av[e] * s2 * w2v[e];
            }
        }
        for (int k = tid + PRE_REGS * nt; k < K; k += nt) {
            if (PRE >= 1 && write_v) v_out[(i64)r * K + k] = x[xs_index<SW>(k)];
            x[xs_index<SW>(k)] = x[xs_index<SW>(k)] * s2 * w2[k];
        }
    }
}

// A weight's 16 bytes. MV_LOAD_NC (an experiment): through the read-only path, not kept in L1
// (each byte is read once) and with a 256-byte L2 prefetch hint; by default a plain load.
__device__ __forceinline__ uint4 ld_weight(const void* p) {
#if MV_LOAD_NC
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
#else
    return *reinterpret_cast<const uint4*>(p);
#endif
}

template <typename TW, int R, int PRE, int MM>
__global__ void __launch_bounds__(MV_WARPS * 32) k_matvec(const TW* w, const float* a, const float* b, const float* w1,
                         const float* w2, float* v_out, float* out, int M, int N, int K, i64 a_rs,
                         i64 b_rs, float eps1, float eps2, int early) {
    PDL_LAUNCH();
    constexpr int T = 16 / R;  // 16-byte pieces per lane per row per pass
    constexpr int V = VecOf<TW>::n;
    extern __shared__ float xs[];  // M rows of K: the product's input
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows_per_block = MV_WARPS * R;
    const int pieces = K / V;  // 16-byte pieces per row
    uint4 raw[R][T];
    int row0 = blockIdx.x * rows_per_block + warp * R;
    // early: w is a weight, which no kernel writes, so its loads may precede the wait
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1) PDL_WAIT();  // the input is the previous kernel's
        if ((pass == 0) != (early != 0)) continue;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = lane + 32 * t;
                if (row0 + r < N && p < pieces)
                    raw[r][t] = ld_weight(w + (i64)(row0 + r) * K + p * V);
            }
    }
    build_input<PRE>(xs, a, b, w1, w2, v_out, M, K, a_rs, b_rs, eps1, eps2, red);
    __syncthreads();
    bool loaded = true;
    for (int base = blockIdx.x * rows_per_block; base < N; base += gridDim.x * rows_per_block) {
        row0 = base + warp * R;
        float acc[MM][R];
#pragma unroll
        for (int m = 0; m < MM; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
        for (int p0 = 0; p0 < pieces; p0 += 32 * T) {
            if (!loaded) {
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const int p = p0 + lane + 32 * t;
                        if (row0 + r < N && p < pieces)
                            raw[r][t] = ld_weight(w + (i64)(row0 + r) * K + p * V);
                    }
            }
            loaded = false;
            if (p0 + 32 * T >= pieces && base + gridDim.x * rows_per_block >= N) PDL_LATE();
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = p0 + lane + 32 * t;
                if (p >= pieces) break;
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    float f[8];
                    cvt8(raw[r][t], w, f);
#pragma unroll
                    for (int m = 0; m < MM; ++m)
                        if (m < M && row0 + r < N) acc[m][r] += dotv<V>(f, xs + (i64)m * K + p * V);
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MM; ++m)
            if (m < M)
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float s = warp_sum(acc[m][r]);
                    if (lane == 0 && row0 + r < N) out[(i64)m * N + row0 + r] = s;
                }
    }
}

// ---- attention front end: per-head RMS norm, rope, both cache writes -------------------------
// One block per (token, head slot); slots are the query heads, then the key heads, then the
// value heads. q, k, v are (n, heads, D) views with any token and head strides.
template <typename TC>
__global__ void k_rope_store(const float* q, const float* k, const float* v, i64 q_ts, i64 q_hs,
                             i64 k_ts, i64 k_hs, i64 v_ts, i64 v_hs, const float* qw,
                             const float* kw, float q_eps, float k_eps, const int* pos,
                             const int* idx, float* q_out, TC* k_cache, TC* v_cache, int Hq, int Hk,
                             int D, int Dv, i64 n_cache, int n_dims, int neox, double base,
                             double freq_scale) {
    PDL_ENTRY();
    extern __shared__ float xs[];  // one head vector, normalised
    __shared__ float red[32];
    const int t = blockIdx.x, s = blockIdx.y;
    const i64 row = idx[t];
    if (s >= Hq + Hk) {
        const int h = s - Hq - Hk;
        if (row < 0 || row >= n_cache) return;
        for (int d = threadIdx.x; d < Dv; d += blockDim.x)
            st(v_cache, (row * Hk + h) * Dv + d, v[t * v_ts + h * v_hs + d]);
        return;
    }
    const bool is_q = s < Hq;
    const int h = is_q ? s : s - Hq;
    const float* x = is_q ? q + t * q_ts + h * q_hs : k + t * k_ts + h * k_hs;
    const float* w = is_q ? qw : kw;
    float ss = 0.f;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        const float val = x[d];
        xs[d] = val;
        ss += val * val;
    }
    if (w != nullptr) {
        const float r = rsqrtf(block_sum(ss, red) / D + (is_q ? q_eps : k_eps));
        for (int d = threadIdx.x; d < D; d += blockDim.x) xs[d] = xs[d] * r * w[d];
    }
    __syncthreads();
    if (!is_q && (row < 0 || row >= n_cache)) return;
    const int half = n_dims / 2;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float y;
        if (d >= n_dims) {
            y = xs[d];
        } else {
            int i, d0, d1;
            bool lo;
            if (neox) {
                i = d % half;
                d0 = i;
                d1 = i + half;
                lo = d < half;
            } else {
                i = d / 2;
                d0 = 2 * i;
                d1 = 2 * i + 1;
                lo = (d & 1) == 0;
            }
            const double theta = (double)pos[t] * freq_scale * pow(base, -2.0 * i / n_dims);
            double sn, cs;
            sincos(theta, &sn, &cs);
            const float c = (float)cs, sv = (float)sn;
            y = lo ? xs[d0] * c - xs[d1] * sv : xs[d0] * sv + xs[d1] * c;
        }
        if (is_q) q_out[((i64)t * Hq + h) * D + d] = y;
        else st(k_cache, (row * Hk + h) * D + d, y);
    }
}

// ---- attention for few query tokens (decode) -------------------------------------------------
// grid (n * Hk * groups, splits); 256 threads. A block walks its share of keys in tiles of 64:
// four threads per key compute the scores of up to QG query heads, one warp per head turns
// them into probabilities (online softmax across tiles), then each warp takes 8 keys' V rows,
// DM / 8 lanes per row with 8 output dims each (at DM = 128 a half-warp per row, two rows at
// once). Splits leave partials; the last block of a row to finish (a ticket per row, reset by
// it) merges them, so the whole op is one launch.
// QG (query heads per block: min(H / Hk, QG)) and DM (128 or 256, the head dims' bound) are
// template parameters: every array below is sized by them, so a one-head, 128-dim block (a
// Llama's) holds half the registers a 4-head, 256-dim one does and two blocks share an SM,
// which is what keeps enough of the cache's bytes in flight at depth.
#define DT_KEYS 64
#define DT_WARPS 8
#define DT_THREADS (DT_WARPS * 32)

__device__ __forceinline__ void load8(const float* p, float* f) {
    unpack(p, f);
    unpack(p + 4, f + 4);
}
__device__ __forceinline__ void load8(const half_t* p, float* f) { unpack(p, f); }
__device__ __forceinline__ void load8(const bf16_t* p, float* f) { unpack(p, f); }

template <typename TQ, typename TK, typename TV, int QG, int DM>
__global__ void __launch_bounds__(DT_THREADS, (QG * DM <= 128 ? 2 : 1)) k_attn_decode(const TQ* q, const TK* k, const TV* v, const int* qpos,
                              const int* kpos, float* out, float* part, int* tickets, int H,
                              int Hk, int m, int D, int Dv, float scale, int window, int chunk,
                              int merge_here, int prefix) {
    PDL_ENTRY();
    __shared__ float qs[QG][DM];
    __shared__ float sc[QG][DT_KEYS];
    __shared__ float pacc[DT_WARPS][QG][DM];
    __shared__ float run_max[QG], run_sum[QG], corr[QG];
    __shared__ float split_w[QG][32];
    __shared__ float total[QG];
    __shared__ bool merge;
    const int G = H / Hk, groups = (G + QG - 1) / QG;
    const int row = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
    const int i = row / (Hk * groups), rest = row - i * Hk * groups;
    const int hk = rest / groups, h0 = hk * G + (rest - hk * groups) * QG;
    const int nh = min(QG, hk * G + G - h0);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    constexpr int QN = (QG * DM + DT_THREADS - 1) / DT_THREADS;  // query values per thread
    constexpr int VL = DM / 8, VK = 32 / VL;  // lanes per V row, V rows a warp loads at once
    static_assert(DM == 128 || DM == 256, "one V row per warp or per half-warp (VK 1 or 2)");
    static_assert(QG >= 1 && QG <= DT_WARPS, "one warp per query head's probabilities");
    float qv[QN];  // this thread's share of the query heads
#pragma unroll
    for (int u = 0; u < QN; ++u) {
        const int e = tid + DT_THREADS * u, g = e / DM, d = e - g * DM;
        qv[u] = (g < nh && d < D) ? ld(q, ((i64)i * H + h0 + g) * D + d) : 0.f;
    }
    const int qp = qpos[i];
    if (tid < QG) {
        run_max[tid] = neg_inf();
        run_sum[tid] = 0.f;
    }
    __syncthreads();
    float acc[QG][8];
#pragma unroll
    for (int g = 0; g < QG; ++g)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
    // prefix (AttentionParams.prefix_rows): the keys past the query's row are empty, so the
    // rows 0..qp are what the splits share, cut at run time: one captured graph serves every
    // cache length up to m, reading only the filled rows
    int m_live = m;
    if (prefix) {
        m_live = max(0, min(m, qp + 1));
        const int tiles = (m_live + DT_KEYS - 1) / DT_KEYS;
        chunk = ((tiles + splits - 1) / splits) * DT_KEYS;
    }
    const int j0 = split * chunk, j1 = min(m_live, j0 + chunk);
    const int key = tid >> 2, quarter = tid & 3, sub = lane / VL, d0 = (lane % VL) * 8;
    for (int jt = j0; jt < j1; jt += DT_KEYS) {
        // every load of the tile first, in one round trip: the key positions, this thread's
        // pieces of its key's K row, and the V rows of its warp's 8 keys. Rows past the end
        // are not read; rows that are not visible are read but never used (select, not a
        // product, so garbage in an empty row cannot turn into NaN).
        const int j = jt + key;
        const int kp = j < j1 ? kpos[j] : -1;
        float f[DM / 32][8];
#pragma unroll
        for (int c = 0; c < DM / 32; ++c)
            if (j < j1 && (quarter + 4 * c) * 8 < D)
                load8(k + ((i64)j * Hk + hk) * D + (quarter + 4 * c) * 8, f[c]);
        int vpos[8 / VK];
        float vr[8 / VK][8];
#pragma unroll
        for (int b = 0; b < 8 / VK; ++b) {
            const int jv = jt + warp * 8 + b * VK + sub;
            vpos[b] = jv < j1 ? kpos[jv] : -1;
            if (jv < j1 && d0 < Dv) load8(v + ((i64)jv * Hk + hk) * Dv + d0, vr[b]);
        }
        if (jt == j0) {
#pragma unroll
            for (int u = 0; u < QN; ++u) {
                const int e = tid + DT_THREADS * u;
                if (e < QG * DM) qs[e / DM][e % DM] = qv[u];
            }
            __syncthreads();
        }
        {  // scores: four threads per key
            const bool vis = j < j1 && visible(kp, qp, window);
            float sg[QG];
#pragma unroll
            for (int g = 0; g < QG; ++g) sg[g] = 0.f;
#pragma unroll
            for (int c = 0; c < DM / 32; ++c) {
                const int dc = (quarter + 4 * c) * 8;
                if (dc < D)
#pragma unroll
                    for (int g = 0; g < QG; ++g)
#pragma unroll
                        for (int e = 0; e < 8; ++e) sg[g] += qs[g][dc + e] * f[c][e];
            }
#pragma unroll
            for (int g = 0; g < QG; ++g) {
                sg[g] += __shfl_xor_sync(0xffffffffu, sg[g], 1);
                sg[g] += __shfl_xor_sync(0xffffffffu, sg[g], 2);
            }
            if (quarter == 0)
#pragma unroll
                for (int g = 0; g < QG; ++g) sc[g][key] = vis ? sg[g] * scale : neg_inf();
        }
        __syncthreads();
        if (warp < nh) {  // probabilities of head `warp`, online across tiles
            const int g = warp;
            const float a0 = sc[g][lane], a1 = sc[g][lane + 32];
            const float old = run_max[g];
            const float nm = fmaxf(old, warp_max(fmaxf(a0, a1)));
            const float p0 = a0 == neg_inf() ? 0.f : expf(a0 - nm);
            const float p1 = a1 == neg_inf() ? 0.f : expf(a1 - nm);
            sc[g][lane] = p0;
            sc[g][lane + 32] = p1;
            const float ts = warp_sum(p0 + p1);
            if (lane == 0) {
                const float c = old == neg_inf() ? 0.f : expf(old - nm);
                corr[g] = c;
                run_sum[g] = run_sum[g] * c + ts;
                run_max[g] = nm;
            }
        } else if (warp < QG && lane == 0) {
            corr[warp] = 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int g = 0; g < QG; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] *= corr[g];
#if !DT_SKIP_PV  // timing experiments only: results are wrong
        if (d0 < Dv)
#else
        if (d0 < 0)
#endif
#pragma unroll
            for (int b = 0; b < 8 / VK; ++b) {
                const bool vis = visible(vpos[b], qp, window);
#pragma unroll
                for (int g = 0; g < QG; ++g) {
                    const float p = sc[g][warp * 8 + b * VK + sub];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[g][e] += vis ? p * vr[b][e] : 0.f;
                }
            }
        __syncthreads();  // sc is rewritten by the next tile
    }
    if (VK == 2)  // the two half-warps' keys: one sum per output dim
#pragma unroll
        for (int g = 0; g < QG; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], 16);
    if (sub == 0 && d0 < Dv)
#pragma unroll
        for (int g = 0; g < QG; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) pacc[warp][g][d0 + e] = acc[g][e];
    __syncthreads();
    for (int g = 0; g < nh; ++g) {
        const i64 ih = (i64)i * H + h0 + g;
        for (int d = tid; d < Dv; d += blockDim.x) {
            float o = 0.f;
#pragma unroll
            for (int w = 0; w < DT_WARPS; ++w) o += pacc[w][g][d];
            if (splits == 1) {
                out[ih * Dv + d] = run_sum[g] > 0.f ? o / run_sum[g] : 0.f;
            } else {
                part[(ih * splits + split) * (Dv + 2) + 2 + d] = o;
            }
        }
        if (splits > 1 && tid == 0) {
            part[(ih * splits + split) * (Dv + 2)] = run_max[g];
            part[(ih * splits + split) * (Dv + 2) + 1] = run_sum[g];
        }
    }
    if (splits == 1) return;
#if DT_SKIP_MERGE  // timing experiments only: results are wrong
    return;
#endif
    if (!merge_here) return;  // a k_attn_combine launch merges the splits
    __threadfence();
    __syncthreads();
    if (tid == 0) merge = atomicAdd(&tickets[row], 1) == splits - 1;
    __syncthreads();
    if (!merge) return;
    __threadfence();
    // one round trip: every split's (max, sum) and this thread's partial outputs of the first
    // 8 splits are loaded together; the weights are then made from shared memory
    for (int e = tid; e < nh * splits; e += blockDim.x) {
        const int g = e / splits, s = e - g * splits;
        const float* p = part + (((i64)i * H + h0 + g) * splits + s) * (Dv + 2);
        split_w[g][s] = __ldcg(p);
        sc[g][s] = __ldcg(p + 1);  // the tile buffer is free now: sums go there
    }
    constexpr int OUTS = QN;  // outputs per thread
    float first[OUTS][8];
#pragma unroll
    for (int u = 0; u < OUTS; ++u) {
        const int e = tid + DT_THREADS * u, g = e / Dv, d = e - g * Dv;
        const float* p = part + ((i64)i * H + h0 + g) * splits * (Dv + 2) + 2 + d;
#pragma unroll
        for (int s = 0; s < 8; ++s)
            first[u][s] = (e < nh * Dv && s < splits) ? __ldcg(p + (i64)s * (Dv + 2)) : 0.f;
    }
    __syncthreads();
    if (tid < nh) {
        float M = neg_inf();
        for (int s = 0; s < splits; ++s) M = fmaxf(M, split_w[tid][s]);
        float S = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float ws = split_w[tid][s] == neg_inf() ? 0.f : expf(split_w[tid][s] - M);
            split_w[tid][s] = ws;
            S += sc[tid][s] * ws;
        }
        total[tid] = S;
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < OUTS; ++u) {
        const int e = tid + DT_THREADS * u, g = e / Dv, d = e - g * Dv;
        if (e >= nh * Dv) continue;
        const i64 ih = (i64)i * H + h0 + g;
        float o = 0.f;
#pragma unroll
        for (int s = 0; s < 8; ++s)
            if (s < splits) o += first[u][s] * split_w[g][s];
        const float* p = part + ih * splits * (Dv + 2) + 2 + d;
        for (int s = 8; s < splits; ++s) o += __ldcg(p + (i64)s * (Dv + 2)) * split_w[g][s];
        out[ih * Dv + d] = total[g] > 0.f ? o / total[g] : 0.f;
    }
    if (tid == 0) tickets[row] = 0;
}

// ---- argmax along the last axis ----------------------------------------------------------------
// grid (rows, parts): each block reduces its part of a row to a key (value in the high 32 bits,
// order-preserving; the complement of the index in the low 32, so the first index wins ties)
// and folds it into best[row] with one atomicMax; the last block of the row to finish writes
// the index and resets best and the ticket for the next launch.
__device__ __forceinline__ unsigned long long argmax_key(float v, unsigned idx) {
    unsigned u = __float_as_uint(v);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)u << 32) | (0xffffffffu - idx);
}

template <typename T>
__global__ void k_argmax(const T* x, int* out, unsigned long long* best, int* tickets, i64 V,
                         i64 chunk) {
    PDL_ENTRY();
    __shared__ unsigned long long red[32];
    const i64 row = blockIdx.x;
    const T* xr = x + row * V;
    const i64 lo = (i64)blockIdx.y * chunk, hi = min(V, lo + chunk);
    unsigned long long key = 0;
#pragma unroll 16
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const unsigned long long c = argmax_key(ld(xr, i), (unsigned)i);
        key = c > key ? c : key;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long c = __shfl_xor_sync(0xffffffffu, key, o);
        key = c > key ? c : key;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[warp] = key;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) key = red[w] > key ? red[w] : key;
        atomicMax(&best[row], key);
        __threadfence();
        if (atomicAdd(&tickets[row], 1) == (int)gridDim.y - 1) {
            const unsigned long long final_key = atomicMax(&best[row], 0ull);
            out[row] = (int)(0xffffffffu - (unsigned)(final_key & 0xffffffffull));
            best[row] = 0;
            tickets[row] = 0;
        }
    }
}
