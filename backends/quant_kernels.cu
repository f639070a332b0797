// Kernels that read GGUF block types as stored. Appended, as text, after kernels.cu and
// quant_blocks.cuh (the block decoders), so everything there is in scope.
//
// k_matvec_q   decode: out = build(a, b, ...) @ dequant(w).T for up to 8 rows, k_matvec's
//              input prologues (norm, GeGLU, ...) with the weight read in its blocks
// k_matvec_q16 the same with the input quantized to int16 and integer dots (the default)
// k_matvec_qs  k_matvec_q16 with the weight's bytes staged through a cp.async ring
// k_get_rows_q row gathers (token embeddings) from a block table, exact as the CPU reference
// k_dequant_f16 rows of a block matrix into f16 scratch, for cuBLAS prompt products
//
// Dequantizing in registers. Each lane owns 32-element pieces (QBlock's unit): it loads a
// piece's bytes, turns its quants into exact integer-valued floats, and takes their dot with the
// input once per input row; the piece's scales multiply the partial sums, not each element:
//     sum_l (d q_l - m) x_l = d * sum_l q_l x_l - m * sum_l x_l
// (Q6_K has two scales per piece, one per 16 elements; Q4_K/Q5_K's "- m" uses the input's
// piece sums, computed once per block). Quants become floats without a conversion instruction
// (a quarter of the FMA rate): a byte q placed under the exponent of 2^23 reads 2^23 + q, and
// one exact subtraction leaves q (minus the type's offset). Per element that is one byte
// permute, one add and one FMA per input row.
//
// Shared memory: a lane reads its piece's 32 inputs as 8 float4s while the other lanes read
// theirs, 32 floats apart: without care all 32 lanes hit the same banks. The input is stored
// swizzled (xs_index<true>): chunk c of piece g sits at chunk (c ^ g) & 7, so the 8 lanes of
// a quarter-warp read 8 different chunks, all 32 banks once.

#ifndef QV_PIECES
#define QV_PIECES 4  // pieces per lane per row per pass, divided by R
#endif

// the quant q (a byte of v, 0..255) minus bias, as an exact float
__device__ __forceinline__ float q_b2f(unsigned v, int byte, float bias) {
    return __int_as_float(__byte_perm(v, 0x4Bu, 0x4550 + byte)) - (8388608.f + bias);
}
// bits 0..3 of x to bit 4 of bytes 0..3
__device__ __forceinline__ unsigned q_spread4(unsigned x) {
    return (((x & 0xFu) * 0x00204081u) & 0x01010101u) << 4;
}

// A piece's quants as bytes, four per word (element 4i + b is byte b of w[i]: unsigned, or
// signed for Q8_0), and its scales: y_l = (l < 16 ? d0 : d1) * (q_l - bias) - mn
struct QInts {
    unsigned w[8];
    float d0, d1, mn;
    int bias;
};

template <int T>
__device__ __forceinline__ void q_ints(const typename QBlock<T>::Raw& r, int g, QInts& p);

template <>
__device__ __forceinline__ void q_ints<QT_Q4_0>(const QBlock<QT_Q4_0>::Raw& r, int, QInts& p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        p.w[i] = r.qs[i] & 0x0F0F0F0Fu;
        p.w[i + 4] = (r.qs[i] >> 4) & 0x0F0F0F0Fu;
    }
    p.d0 = p.d1 = qh2f(r.d);
    p.mn = 0.f;
    p.bias = 8;
}

template <>
__device__ __forceinline__ void q_ints<QT_Q5_0>(const QBlock<QT_Q5_0>::Raw& r, int, QInts& p) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        p.w[i] = (r.qs[i] & 0x0F0F0F0Fu) | q_spread4(r.qh >> (4 * i));
        p.w[i + 4] = ((r.qs[i] >> 4) & 0x0F0F0F0Fu) | q_spread4(r.qh >> (16 + 4 * i));
    }
    p.d0 = p.d1 = qh2f(r.d);
    p.mn = 0.f;
    p.bias = 16;
}

template <>
__device__ __forceinline__ void q_ints<QT_Q8_0>(const QBlock<QT_Q8_0>::Raw& r, int, QInts& p) {
#pragma unroll
    for (int i = 0; i < 8; ++i) p.w[i] = r.qs[i];  // signed bytes
    p.d0 = p.d1 = qh2f(r.d);
    p.mn = 0.f;
    p.bias = 0;
}

template <>
__device__ __forceinline__ void q_ints<QT_Q4_K>(const QBlock<QT_Q4_K>::Raw& r, int g, QInts& p) {
    const int s = g & 7, shift = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 8; ++i) p.w[i] = (r.qs[i] >> shift) & 0x0F0F0F0Fu;
    unsigned sc, m;
    q_scale_min_k4(r.sc, s, sc, m);
    p.d0 = p.d1 = qh2f((unsigned short)(r.dm & 0xFFFFu)) * (float)sc;
    p.mn = qh2f((unsigned short)(r.dm >> 16)) * (float)m;
    p.bias = 0;
}

template <>
__device__ __forceinline__ void q_ints<QT_Q5_K>(const QBlock<QT_Q5_K>::Raw& r, int g, QInts& p) {
    const int s = g & 7, shift = 4 * (s & 1);
#pragma unroll
    for (int i = 0; i < 8; ++i)
        p.w[i] = ((r.qs[i] >> shift) & 0x0F0F0F0Fu) | (((r.qh[i] >> s) & 0x01010101u) << 4);
    unsigned sc, m;
    q_scale_min_k4(r.sc, s, sc, m);
    p.d0 = p.d1 = qh2f((unsigned short)(r.dm & 0xFFFFu)) * (float)sc;
    p.mn = qh2f((unsigned short)(r.dm >> 16)) * (float)m;
    p.bias = 0;
}

template <>
__device__ __forceinline__ void q_ints<QT_Q6_K>(const QBlock<QT_Q6_K>::Raw& r, int g, QInts& p) {
    const int k = g & 3, lo = 4 * (k >> 1), hi = 2 * k;
#pragma unroll
    for (int i = 0; i < 8; ++i)
        p.w[i] = ((r.ql[i] >> lo) & 0x0F0F0F0Fu) | (((r.qh[i] >> hi) & 0x03030303u) << 4);
    const float d = qh2f(r.d);
    p.d0 = d * (float)(signed char)(r.sc & 0xFFu);
    p.d1 = d * (float)(signed char)(r.sc >> 8);
    p.mn = 0.f;
    p.bias = 32;
}

// The piece as integer-valued floats q[32] (q_l - bias, exact) and its scales, for the f32 dot
struct QPiece {
    float q[32];
    float d0, d1, mn;
};

template <int T>
__device__ __forceinline__ void q_words(const typename QBlock<T>::Raw& r, int g, QPiece& p) {
    QInts n;
    q_ints<T>(r, g, n);
    const unsigned flip = T == QT_Q8_0 ? 0x80808080u : 0u;  // signed bytes: q + 128, bias 128
    const float bias = (float)n.bias + (T == QT_Q8_0 ? 128.f : 0.f);
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int b = 0; b < 4; ++b) p.q[4 * i + b] = q_b2f(n.w[i] ^ flip, b, bias);
    p.d0 = n.d0;
    p.d1 = n.d1;
    p.mn = n.mn;
}

template <int T>
struct QHasMin { static const bool v = false; };
template <> struct QHasMin<QT_Q4_K> { static const bool v = true; };
template <> struct QHasMin<QT_Q5_K> { static const bool v = true; };

// the piece's dot with one input row: xp is the row's piece g (swizzled), xsum its sum
template <bool MIN>
__device__ __forceinline__ float q_dot(const QPiece& p, const float* xp, int g, float xsum) {
    const float4* x4 = reinterpret_cast<const float4*>(xp);
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const float4 v = x4[(c ^ g) & 7];
        float& s = c < 4 ? s0 : s1;
        s = fmaf(p.q[4 * c], v.x, s);
        s = fmaf(p.q[4 * c + 1], v.y, s);
        s = fmaf(p.q[4 * c + 2], v.z, s);
        s = fmaf(p.q[4 * c + 3], v.w, s);
    }
    const float r = p.d0 * s0 + p.d1 * s1;
    return MIN ? r - p.mn * xsum : r;
}

// the same with the piece's input already in registers (one input row: loaded once per piece,
// used for every row R of the warp)
template <bool MIN>
__device__ __forceinline__ float q_dot_regs(const QPiece& p, const float* x, float xsum) {
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int l = 0; l < 16; ++l) {
        s0 = fmaf(p.q[l], x[l], s0);
        s1 = fmaf(p.q[l + 16], x[l + 16], s1);
    }
    const float r = p.d0 * s0 + p.d1 * s1;
    return MIN ? r - p.mn * xsum : r;
}

template <int QT, int R, int PRE, int MM>
__global__ void __launch_bounds__(MV_WARPS * 32)
    k_matvec_q(const unsigned char* w, const float* a, const float* b, const float* w1,
               const float* w2, float* v_out, float* out, int M, int N, int K, i64 a_rs, i64 b_rs,
               float eps1, float eps2, int early) {
    PDL_LAUNCH();
    typedef QBlock<QT> B;
    constexpr int T = QV_PIECES / R;
    constexpr bool MIN = QHasMin<QT>::v;
    extern __shared__ float xs[];  // M rows of K (swizzled), then M rows of K / 32 piece sums
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows_per_block = MV_WARPS * R;
    const int P = K >> 5;  // pieces per row
    const i64 row_bytes = (i64)(K / B::QK) * B::BYTES;
    float* xsum = xs + (i64)M * K;
    typename B::Raw raw[R][T];
    int row0 = blockIdx.x * rows_per_block + warp * R;
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1) PDL_WAIT();
        if ((pass == 0) != (early != 0)) continue;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = lane + 32 * t;
                if (row0 + r < N && p < P) raw[r][t] = B::load(w + (i64)(row0 + r) * row_bytes, p);
            }
    }
    build_input<PRE, true>(xs, a, b, w1, w2, v_out, M, K, a_rs, b_rs, eps1, eps2, red);
    __syncthreads();
    if (MIN) {
        for (int i = threadIdx.x; i < M * P; i += blockDim.x) {
            const float4* x4 = reinterpret_cast<const float4*>(xs + (i64)i * 32);
            float s = 0.f;
#pragma unroll
            for (int c = 0; c < 8; ++c) {  // in swizzled order: neighbours read other banks
                const float4 v = x4[(c ^ i) & 7];
                s += (v.x + v.y) + (v.z + v.w);
            }
            xsum[i] = s;
        }
        __syncthreads();
    }
    bool loaded = true;
    for (int base = blockIdx.x * rows_per_block; base < N; base += gridDim.x * rows_per_block) {
        row0 = base + warp * R;
        float acc[MM][R];
#pragma unroll
        for (int m = 0; m < MM; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
        for (int p0 = 0; p0 < P; p0 += 32 * T) {
            if (!loaded) {
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const int p = p0 + lane + 32 * t;
                        if (row0 + r < N && p < P)
                            raw[r][t] = B::load(w + (i64)(row0 + r) * row_bytes, p);
                    }
            }
            loaded = false;
            if (p0 + 32 * T >= P && base + gridDim.x * rows_per_block >= N) PDL_LATE();
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = p0 + lane + 32 * t;
                if (p >= P) break;
                if (MM == 1) {  // one input row: its piece in registers, shared by the R rows
                    float x[32];
                    const float4* x4 = reinterpret_cast<const float4*>(xs + p * 32);
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        const float4 v = x4[(c ^ p) & 7];
                        x[4 * c] = v.x;
                        x[4 * c + 1] = v.y;
                        x[4 * c + 2] = v.z;
                        x[4 * c + 3] = v.w;
                    }
                    const float xsm = MIN ? xsum[p] : 0.f;
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        if (row0 + r >= N) continue;
                        QPiece q;
                        q_words<QT>(raw[r][t], p, q);
                        acc[0][r] += q_dot_regs<MIN>(q, x, xsm);
                    }
                    continue;
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    if (row0 + r >= N) continue;
                    QPiece q;
                    q_words<QT>(raw[r][t], p, q);
#pragma unroll
                    for (int m = 0; m < MM; ++m)
                        if (m < M)
                            acc[m][r] += q_dot<MIN>(q, xs + (i64)m * K + p * 32, p,
                                                    MIN ? xsum[m * P + p] : 0.f);
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

// ---- the integer variant ----------------------------------------------------------------------
// k_matvec_q16: the input quantized once per block to int16 per 32-element piece (scale
// max|x| / 32767), and each piece's dot taken in integers, two products per instruction
// (dp2a: two int16 inputs times two of the weight's bytes, summed into an int32):
//     sum_l (d q_l - m) x_l ~ dx (d * sum_l q_l xq_l - m * sum_l xq_l)
// Per 4 elements: the bytes' masks and shifts and 2 dp2a, against 4 byte permutes, adds and
// FMAs in the float variant. int8 inputs (llama.cpp's q8_1, dp4a) were ruled out by the
// accuracy bar: on the real Gemma 3 270M they left logits at cosine 0.996 against f32 and
// changed 2% of the top-1 tokens; int16 gives 0.9999998 and changes none (NumPy emulation of
// both). Shared memory: the f32 input as built (swizzled), then the int16 input stored chunk-
// major (16-byte chunk c of piece g at (c * P + g): neighbouring lanes read neighbouring
// chunks, no bank conflicts), then per piece its scale and the two halves' sums of xq.

__device__ __forceinline__ int dp2a_lo(unsigned x2, unsigned w4, int c) {
    return __dp2a_lo((int)x2, (int)w4, c);
}
__device__ __forceinline__ int dp2a_hi(unsigned x2, unsigned w4, int c) {
    return __dp2a_hi((int)x2, (int)w4, c);
}

// Every piece i = (m, g) of the built input (xs: M rows of K f32, swizzled) quantized to int16:
// xq chunk-major per row (16-byte chunk c of piece g at c * P + g), info[i] = (scale as float
// bits, sum of the first 16 quants, sum of the last 16, the whole sum as float bits: converted
// here once per piece, not per weight row). The whole block takes part.
__device__ __forceinline__ void q16_quantize(const float* xs, uint4* xq, int4* info, int M, int P) {
    for (int i = threadIdx.x; i < M * P; i += blockDim.x) {  // quantize piece i = (m, g)
        const int m = i / P, g = i - m * P;
        const float4* x4 = reinterpret_cast<const float4*>(xs + (i64)i * 32);
        float x[32];
        float amax = 0.f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const float4 v = x4[(c ^ g) & 7];
            x[4 * c] = v.x;
            x[4 * c + 1] = v.y;
            x[4 * c + 2] = v.z;
            x[4 * c + 3] = v.w;
        }
#pragma unroll
        for (int l = 0; l < 32; ++l) amax = fmaxf(amax, fabsf(x[l]));
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        unsigned pk[16];
        int s0 = 0, s1 = 0;
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const int lo = __float2int_rn(x[2 * e] * inv), hi = __float2int_rn(x[2 * e + 1] * inv);
            pk[e] = ((unsigned)lo & 0xFFFFu) | ((unsigned)hi << 16);
            if (e < 8) s0 += lo + hi;
            else s1 += lo + hi;
        }
        uint4* dst = xq + (i64)m * P * 4;
#pragma unroll
        for (int c = 0; c < 4; ++c)
            dst[(i64)c * P + g] = make_uint4(pk[4 * c], pk[4 * c + 1], pk[4 * c + 2], pk[4 * c + 3]);
        info[i] = make_int4(__float_as_int(amax / 32767.f), s0, s1, __float_as_int((float)(s0 + s1)));
    }
}

// piece p of input row m as 16 words of int16 pairs
__device__ __forceinline__ void q16_input(const uint4* xq, int m, int P, int p, unsigned* xw) {
    const uint4* src = xq + (i64)m * P * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const uint4 v = src[(i64)c * P + p];
        xw[4 * c] = v.x;
        xw[4 * c + 1] = v.y;
        xw[4 * c + 2] = v.z;
        xw[4 * c + 3] = v.w;
    }
}

// dp2a with signed int16 pairs (a) and unsigned bytes (b): bytes up to 255
__device__ __forceinline__ int dp2a_su_lo(unsigned a, unsigned b, int c) {
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int dp2a_su_hi(unsigned a, unsigned b, int c) {
    int d;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// u (below 2^23) as an exact float, without a conversion instruction (see q_b2f)
__device__ __forceinline__ float q_u2f(unsigned u) {
    return __int_as_float(0x4B000000u | u) - 8388608.f;
}

// a weight piece's dot with the int16 input piece (xw, its info in), in the input's scale.
// Q4_K, the decode that issue bounds (benchmarks/NOTES.md), takes a leaner path: one scale
// for the whole piece, so one sum; its sub-block's nibbles masked in place (an odd sub-block's
// high nibbles count 16 times, every term a multiple of 16, so the sum shifts back exactly);
// the 6-bit scale and min made floats with an OR and a subtraction, not conversions.
template <int QT>
__device__ __forceinline__ float q16_dot(const typename QBlock<QT>::Raw& raw, int p,
                                         const unsigned* xw, const int4& in) {
    if constexpr (QT == QT_Q4_K && !Q4K_CLASSIC) {  // Q4K_CLASSIC (an experiment): generic path
        const int s = p & 7, shift = 4 * (s & 1);
        const unsigned mask = 0x0F0F0F0Fu << shift;
        int i0 = 0, i1 = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned lo = raw.qs[i] & mask, hi = raw.qs[i + 4] & mask;
            i0 = dp2a_su_lo(xw[2 * i], lo, i0);
            i0 = dp2a_su_hi(xw[2 * i + 1], lo, i0);
            i1 = dp2a_su_lo(xw[2 * i + 8], hi, i1);
            i1 = dp2a_su_hi(xw[2 * i + 9], hi, i1);
        }
        unsigned sc, m;
        q_scale_min_k4(raw.sc, s, sc, m);
        const float d = qh2f((unsigned short)(raw.dm & 0xFFFFu)) * q_u2f(sc);
        const float mn = qh2f((unsigned short)(raw.dm >> 16)) * q_u2f(m);
        const float v = d * (float)((i0 + i1) >> shift) - mn * __int_as_float(in.w);
        return __int_as_float(in.x) * v;
    }
    QInts q;
    q_ints<QT>(raw, p, q);
    int i0 = 0, i1 = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        i0 = dp2a_lo(xw[2 * i], q.w[i], i0);
        i0 = dp2a_hi(xw[2 * i + 1], q.w[i], i0);
        i1 = dp2a_lo(xw[2 * i + 8], q.w[i + 4], i1);
        i1 = dp2a_hi(xw[2 * i + 9], q.w[i + 4], i1);
    }
    const float v = q.d0 * (float)(i0 - q.bias * in.y) + q.d1 * (float)(i1 - q.bias * in.z) -
                    q.mn * __int_as_float(in.w);
    return __int_as_float(in.x) * v;
}

template <int QT, int R, int PRE, int MM>
__global__ void __launch_bounds__(MV_WARPS * 32)
    k_matvec_q16(const unsigned char* w, const float* a, const float* b, const float* w1,
                 const float* w2, float* v_out, float* out, int M, int N, int K, i64 a_rs, i64 b_rs,
                 float eps1, float eps2, int early) {
    PDL_LAUNCH();
    typedef QBlock<QT> B;
    constexpr int T = QV_PIECES / R;
    extern __shared__ float xs[];  // M x K f32 (swizzled), M x K int16, M x P int4
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows_per_block = MV_WARPS * R;
    const int P = K >> 5;
    const i64 row_bytes = (i64)(K / B::QK) * B::BYTES;
    uint4* xq = reinterpret_cast<uint4*>(xs + (i64)M * K);  // 16-byte chunks, 4 per piece
    int4* info = reinterpret_cast<int4*>(xq + (i64)M * P * 4);
    typename B::Raw raw[R][T];
    int row0 = blockIdx.x * rows_per_block + warp * R;
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1) PDL_WAIT();
        if ((pass == 0) != (early != 0)) continue;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = lane + 32 * t;
                if (row0 + r < N && p < P) raw[r][t] = B::load(w + (i64)(row0 + r) * row_bytes, p);
            }
    }
    build_input<PRE, true>(xs, a, b, w1, w2, v_out, M, K, a_rs, b_rs, eps1, eps2, red);
    __syncthreads();
    q16_quantize(xs, xq, info, M, P);
    __syncthreads();
    bool loaded = true;
    for (int base = blockIdx.x * rows_per_block; base < N; base += gridDim.x * rows_per_block) {
        row0 = base + warp * R;
        float acc[MM][R];
#pragma unroll
        for (int m = 0; m < MM; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
        for (int p0 = 0; p0 < P; p0 += 32 * T) {
            if (!loaded) {
#pragma unroll
                for (int r = 0; r < R; ++r)
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const int p = p0 + lane + 32 * t;
                        if (row0 + r < N && p < P)
                            raw[r][t] = B::load(w + (i64)(row0 + r) * row_bytes, p);
                    }
            }
            loaded = false;
            if (p0 + 32 * T >= P && base + gridDim.x * rows_per_block >= N) PDL_LATE();
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const int p = p0 + lane + 32 * t;
                if (p >= P) break;
#pragma unroll
                for (int m = 0; m < MM; ++m) {
                    if (m >= M) break;
                    unsigned xw[16];
                    q16_input(xq, m, P, p, xw);
                    const int4 in = info[m * P + p];
#pragma unroll
                    for (int r = 0; r < R; ++r)
                        if (row0 + r < N) acc[m][r] += q16_dot<QT>(raw[r][t], p, xw, in);
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

// ---- the staged variant ------------------------------------------------------------------------
// k_matvec_qs: k_matvec_q16's arithmetic, with the weight's bytes brought in by cp.async into a
// ring of MVQ_STAGES rounds in shared memory per warp, MVQ_STAGES - 1 of them in flight while
// the warp computes one. In k_matvec_q16 a warp loads one round (R rows x 32T pieces) into
// registers and waits for it before it can ask for the next: every round pays the memory's
// latency, hidden only by the other warps of its SM, and registers bound what is in flight
// (measured: the 7B's Q4_K products at ~1.5 TB/s of the H100's 3.06). The copies need no
// registers, so the ring keeps each warp's next rounds in flight whatever the block type.
// A warp copies its rows' bytes of a round as aligned 16-byte chunks covering them (rows of
// Q8_0's 34-byte or Q6_K's 210-byte blocks need not start 16-byte aligned: the ring keeps the
// bytes' offset within their chunk, so the block decoders' word loads align as in memory), and
// reads each piece back with the decoders' loads. Work is spread by row group over every warp
// of the grid (group gw, gw + all warps, ...), so a short product still reaches every SM.
// The aligned chunks reach up to 15 bytes before a row's first block and after its last: for
// the tensor's first and last rows that is outside its bytes but inside the 16-byte aligned
// granule of a byte that is in it, so inside the allocation (as q_ld2w's extra word).
// Needs sm_80's cp.async; below that the copy is a plain load and store (correct, not staged).
#ifndef MVQ_STAGES
#define MVQ_STAGES 4
#endif
#ifndef MVQS_TRIGGER_WARP0
#define MVQS_TRIGGER_WARP0 0
#endif
#ifndef MVS_PIECES
#define MVS_PIECES 2  // pieces per lane per round over the warp's R rows (at least one per row)
#endif

// a round's shape for type QT at T pieces per lane per row: 32T pieces of a row, in BLOCKS
// blocks, copied as at most CHUNKS 16-byte chunks (one more where they start unaligned)
template <int QT, int T>
struct QStage {
    static constexpr int PR = 32 * T;
    static constexpr int BLOCKS = PR * 32 / QBlock<QT>::QK;
    static constexpr int CHUNKS = (BLOCKS * QBlock<QT>::BYTES + 30) / 16;
};

__device__ __forceinline__ void mv_copy16(uint4* dst, const unsigned char* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned d;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(d) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(src) : "memory");
#else
    *dst = *reinterpret_cast<const uint4*>(src);
#endif
}
__device__ __forceinline__ void mv_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// wait until at most MVQ_STAGES - 2 rounds are still being copied (the oldest one has landed)
__device__ __forceinline__ void mv_wait_oldest() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(MVQ_STAGES - 2) : "memory");
#endif
    __syncwarp();
}

template <int QT, int R, int PRE, int MM>
__global__ void __launch_bounds__(MV_WARPS * 32)
    k_matvec_qs(const unsigned char* w, const float* a, const float* b, const float* w1,
                const float* w2, float* v_out, float* out, int M, int N, int K, i64 a_rs, i64 b_rs,
                float eps1, float eps2, int early) {
    static_assert(MVQ_STAGES >= 2, "a ring needs a round in flight and one being read");
    PDL_LAUNCH();
    typedef QBlock<QT> B;
    constexpr int T = MVS_PIECES / R > 0 ? MVS_PIECES / R : 1;
    typedef QStage<QT, T> S;
    constexpr int SLOT = R * S::CHUNKS;  // one warp's round: R rows' chunks
    // the warps' rings (MV_WARPS x MVQ_STAGES x SLOT chunks), then k_matvec_q16's input
    extern __shared__ uint4 mvq_ring[];
    __shared__ float red[32];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int P = K >> 5;
    const int NR = (P + S::PR - 1) / S::PR;  // rounds per row group
    const int nb = K / B::QK;                // blocks per row
    const i64 row_bytes = (i64)nb * B::BYTES;
    uint4* ring = mvq_ring + (i64)warp * MVQ_STAGES * SLOT;
    float* xs = reinterpret_cast<float*>(mvq_ring + (i64)MV_WARPS * MVQ_STAGES * SLOT);
    uint4* xq = reinterpret_cast<uint4*>(xs + (i64)M * K);
    int4* info = reinterpret_cast<int4*>(xq + (i64)M * P * 4);
    const int GW = gridDim.x * MV_WARPS, gw = warp * gridDim.x + blockIdx.x;
    const int groups = (N + R - 1) / R;
    const int rounds = gw < groups ? ((groups - 1 - gw) / GW + 1) * NR : 0;
    // round j: row group gw + (j / NR) * GW, pieces from (j % NR) * PR; every lane commits one
    // group per round (empty past the last), so the wait counts stay uniform
    auto issue = [&](int j) {
        if (j < rounds) {
            const int g = gw + (j / NR) * GW, b0 = (j % NR) * S::BLOCKS;
            const int b1 = min(b0 + S::BLOCKS, nb);
            uint4* slot = ring + (j % MVQ_STAGES) * SLOT;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = g * R + r;
                if (row >= N) break;
                const unsigned char* lo = w + row * row_bytes + (i64)b0 * B::BYTES;
                const unsigned char* al = lo - ((unsigned long long)lo & 15u);
                const int n = (int)((lo + (i64)(b1 - b0) * B::BYTES - al + 15) >> 4);
                for (int c = lane; c < n; c += 32) mv_copy16(slot + r * S::CHUNKS + c, al + 16 * c);
            }
        }
        mv_commit();
    };
    for (int pass = 0; pass < 2; ++pass) {
        if (pass == 1) PDL_WAIT();
        if ((pass == 0) != (early != 0)) continue;  // early: weights, which no kernel writes
        for (int j = 0; j < MVQ_STAGES - 1; ++j) issue(j);
    }
    // PDL_LATE: the block's first call triggers it (the PTX ISA: later calls have no effect);
    // MVQS_TRIGGER_WARP0=1 (an experiment) leaves it to warp 0, the busiest (lowest row groups)
    const bool trigger = !MVQS_TRIGGER_WARP0 || warp == 0;
    if (trigger && rounds <= MVQ_STAGES - 1) PDL_LATE();  // every copy of this warp's is issued
    build_input<PRE, true>(xs, a, b, w1, w2, v_out, M, K, a_rs, b_rs, eps1, eps2, red);
    __syncthreads();
    q16_quantize(xs, xq, info, M, P);
    __syncthreads();
    float acc[MM][R];
#pragma unroll
    for (int m = 0; m < MM; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
    for (int j = 0; j < rounds; ++j) {
        mv_wait_oldest();              // round j has landed, and every lane is done with j - 1
        issue(j + MVQ_STAGES - 1);     // into j - 1's slot
        if (trigger && j + MVQ_STAGES == rounds) PDL_LATE();  // this warp's last copy
        const int g = gw + (j / NR) * GW, q = j % NR, p0 = q * S::PR;
        const unsigned char* slot =
            reinterpret_cast<const unsigned char*>(ring + (j % MVQ_STAGES) * SLOT);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const int p = p0 + lane + 32 * t;
            if (p >= P) break;
            typename B::Raw raw[R];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const int row = g * R + r;
                if (row >= N) break;
                const unsigned lo = (unsigned)(unsigned long long)(w + row * row_bytes) & 15u;
                const unsigned off = (lo + (unsigned)(q * S::BLOCKS * B::BYTES)) & 15u;
                raw[r] = B::load(slot + 16 * r * S::CHUNKS + off, p - p0);
            }
#pragma unroll
            for (int m = 0; m < MM; ++m) {
                if (m >= M) break;
                unsigned xw[16];
                q16_input(xq, m, P, p, xw);
                const int4 in = info[m * P + p];
#pragma unroll
                for (int r = 0; r < R; ++r)
                    if (g * R + r < N) acc[m][r] += q16_dot<QT>(raw[r], p, xw, in);
            }
        }
        if (q == NR - 1) {  // the row group's last round
#pragma unroll
            for (int m = 0; m < MM; ++m)
                if (m < M)
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const float s = warp_sum(acc[m][r]);
                        acc[m][r] = 0.f;
                        if (lane == 0 && g * R + r < N) out[(i64)m * N + g * R + r] = s;
                    }
        }
    }
}

// one thread per (gathered row, piece): decode exactly as the CPU reference
template <int QT>
__global__ void k_get_rows_q(const unsigned char* table, const int* idx, float* out, i64 n, int K,
                             i64 n_table) {
    PDL_ENTRY();
    typedef QBlock<QT> B;
    const int P = K >> 5;
    const i64 row_bytes = (i64)(K / B::QK) * B::BYTES;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * P;
         i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / P;
        const int g = (int)(i - r * P);
        const i64 t = idx[r];
        float y[32];
        if (t >= 0 && t < n_table) {
            B::decode(B::load(table + t * row_bytes, g), g, y);
        } else {  // out of range: NaN, visibly wrong instead of a fault (as k_get_rows)
#pragma unroll
            for (int l = 0; l < 32; ++l) y[l] = __int_as_float(0x7fc00000);
        }
        float4* o = reinterpret_cast<float4*>(out + r * K + g * 32);
#pragma unroll
        for (int c = 0; c < 8; ++c) o[c] = make_float4(y[4 * c], y[4 * c + 1], y[4 * c + 2], y[4 * c + 3]);
    }
}

// rows [0, n) of a block matrix of K columns into f16 out (n, K), one thread per piece: its 32
// values packed in pairs and written as four 16-byte stores (2-byte stores, one per value,
// made the first version 10x slower than its bytes)
template <int QT>
__global__ void k_dequant_f16(const unsigned char* w, half_t* out, i64 n, int K) {
    PDL_ENTRY();
    typedef QBlock<QT> B;
    const int P = K >> 5;
    const i64 row_bytes = (i64)(K / B::QK) * B::BYTES;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n * P;
         i += (i64)gridDim.x * blockDim.x) {
        const i64 r = i / P;
        const int g = (int)(i - r * P);
        float y[32];
        B::decode(B::load(w + r * row_bytes, g), g, y);
        unsigned h[16];
#pragma unroll
        for (int e = 0; e < 16; ++e) h[e] = (unsigned)f2h(y[2 * e]) | ((unsigned)f2h(y[2 * e + 1]) << 16);
        uint4* o = reinterpret_cast<uint4*>(out + r * K + g * 32);
#pragma unroll
        for (int c = 0; c < 4; ++c) o[c] = make_uint4(h[4 * c], h[4 * c + 1], h[4 * c + 2], h[4 * c + 3]);
    }
}

// an f32 activation as two f16 halves, x = hi + lo / 2048: the prompt products multiply both
// by the f16 weight tile (two cuBLAS calls, the second scaled by 1/2048 and accumulating), so
// that only the weight is rounded. lo is scaled up so that small activations (|x| < 0.1 after
// GeGLU) keep their bits instead of becoming f16 subnormals. |x| beyond 65504: hi is inf and
// lo 0, so the product is inf, visibly.
__global__ void k_split_f16(const float* x, half_t* hi, half_t* lo, i64 n) {
    PDL_ENTRY();
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const unsigned short h = f2h(v);
        const float hf = h2f(h);
        hi[i].x = h;
        lo[i].x = isfinite(hf) ? f2h((v - hf) * 2048.f) : (unsigned short)0;
    }
}
