// GGUF block decoders for the quantized matrix-vector kernels: read weights in their file layout.
//
// Appended, as text, to kernels.cu (NVRTC: no headers, so nothing is included here) and also
// compiled as host C++17 by tests/quant_harness.cpp, which checks every decoder against
// gguf.quants.dequantize. The host prelude defines QDEV, uint4 and qh2f (setting QH2F_DEFINED).
//
// A *piece* is 32 consecutive elements of a row: piece g of a row of K elements is block
// g / (QK/32), sub-piece g % (QK/32) (K types: sub-block s of 8). QBlock<T>::load(row, g) reads
// into registers (Raw) exactly the bytes piece g needs; decode(raw, g, y) writes its 32 values,
// y[0..31] in element order, with ggml's reference arithmetic (dequantize_row_*, same operation
// order, so the result is bit-identical to the CPU reference). Every product is exact in float
// (fp16 d: 11 significant bits, times scale and quant: at most 23), so the only rounding is the K
// types' final "- m1": results do not depend on FMA contraction (NVRTC's default) or association.
//
// Alignment: rows are stored back to back, so a block starts at a multiple of BYTES from a
// (well aligned) tensor start. Q4_0 (18), Q5_0 (22), Q8_0 (34) and Q6_K (210) blocks are only
// guaranteed 2-byte alignment: they are read as aligned words shifted into place (q_ld2w), or,
// with QLOAD_SHORTS, as unsigned short loads packed in pairs into 32-bit registers. Q4_K
// (144) and Q5_K (176) are multiples of 16, so their blocks start 16-byte aligned: quants and
// high bits are read with uint4 loads, d/dmin/scales with unsigned int loads. Few, wide loads:
// this code is bandwidth bound.

#ifndef QDEV
#define QDEV __device__ __forceinline__
#endif

#ifndef QH2F_DEFINED
#define QH2F_DEFINED
QDEV float qh2f(unsigned short h) { return h2f(h); }
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__) || defined(__CUDA_ARCH__)
#define QUNROLL _Pragma("unroll")
#else
#define QUNROLL
#endif

// ggml type ids (enum ggml_type)
#define QT_Q4_0 2
#define QT_Q5_0 6
#define QT_Q8_0 8
#define QT_Q4_K 12
#define QT_Q5_K 13
#define QT_Q6_K 14

// two little-endian unsigned shorts at p (2-byte aligned) as one 32-bit word
QDEV unsigned q_ld2x16(const unsigned char* p) {
    const unsigned short* s = reinterpret_cast<const unsigned short*>(p);
    return (unsigned)s[0] | ((unsigned)s[1] << 16);
}
// the low 32 bits of (hi:lo) >> sh, sh in 0..31
QDEV unsigned q_fshr(unsigned lo, unsigned hi, unsigned sh) {
#if defined(__CUDA_ARCH__)
    return __funnelshift_r(lo, hi, sh);
#else
    return (unsigned)((((unsigned long long)hi << 32) | lo) >> sh);
#endif
}
// N 32-bit words from p (2-byte aligned), each two little-endian unsigned shorts: N aligned
// 4-byte loads, plus one more where p is 2 mod 4, funnel-shifted by 16 bits. Half the load
// instructions of 2N 2-byte loads (QLOAD_SHORTS, kept as an experiment), which measured
// 4-29% longer on the 7B shape's Q6_K and Q8_0 matrices (benchmarks/NOTES.md).
// That extra word reaches 2 bytes past the range, inside the same aligned 4-byte word as the
// range's last byte, so inside the allocation.
template <int N>
QDEV void q_ld2w(const unsigned char* p, unsigned* w) {
#if !QLOAD_SHORTS
    const unsigned off = (unsigned)(unsigned long long)p & 2u;  // 0 or 2
    // p - off, not an integer turned back into a pointer: the loads stay global (ld.global)
    const unsigned* a = reinterpret_cast<const unsigned*>(p - off);
    const unsigned sh = off * 8u;
    unsigned v[N + 1];
    QUNROLL
    for (int i = 0; i < N; ++i) v[i] = a[i];
    v[N] = sh ? a[N] : 0u;
    QUNROLL
    for (int i = 0; i < N; ++i) w[i] = q_fshr(v[i], v[i + 1], sh);
#else
    QUNROLL
    for (int i = 0; i < N; ++i) w[i] = q_ld2x16(p + 4 * i);
#endif
}
// byte i (0..) of a little-endian array of 32-bit words
QDEV unsigned q_byte(const unsigned* w, int i) { return (w[i >> 2] >> (8 * (i & 3))) & 0xFFu; }
// 32 bytes at p (16-byte aligned): two uint4 loads
QDEV void q_ld32(const unsigned char* p, unsigned* w) {
    const uint4 a = *reinterpret_cast<const uint4*>(p);
    const uint4 b = *reinterpret_cast<const uint4*>(p + 16);
    w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
    w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
}
// ggml's get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 packed scale bytes
// (sc[0..2] as three words), with shifts only: indexing the words by j would put the block's
// registers in local memory
QDEV void q_scale_min_k4(const unsigned* sc, int j, unsigned& s, unsigned& m) {
    const int sh = 8 * (j & 3);
    const unsigned b0 = (sc[0] >> sh) & 0xFFu, b1 = (sc[1] >> sh) & 0xFFu;
    const unsigned b2 = (sc[2] >> sh) & 0xFFu;
    if (j < 4) {
        s = b0 & 63u;
        m = b1 & 63u;
    } else {
        s = (b2 & 0xFu) | ((b0 >> 6) << 4);
        m = (b2 >> 4) | ((b1 >> 6) << 4);
    }
}

template <int T>
struct QBlock;

// d (f16), qs[16]: element j < 16 is the low nibble of qs[j], j + 16 its high nibble
template <>
struct QBlock<QT_Q4_0> {
    static constexpr int QK = 32;
    static constexpr int BYTES = 18;
    struct Raw {
        unsigned short d;
        unsigned qs[4];
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + g * BYTES;
        Raw r;
        r.d = *reinterpret_cast<const unsigned short*>(b);
        q_ld2w<4>(b + 2, r.qs);
        return r;
    }
    static QDEV void decode(const Raw& r, int, float* y) {
        const float d = qh2f(r.d);
        QUNROLL
        for (int j = 0; j < 16; ++j) {
            const unsigned q = q_byte(r.qs, j);
            y[j] = (float)((int)(q & 0xFu) - 8) * d;
            y[j + 16] = (float)((int)(q >> 4) - 8) * d;
        }
    }
};

// d (f16), qh (u32 LE: bit j is element j's 5th bit), qs[16] as Q4_0
template <>
struct QBlock<QT_Q5_0> {
    static constexpr int QK = 32;
    static constexpr int BYTES = 22;
    struct Raw {
        unsigned short d;
        unsigned qh;
        unsigned qs[4];
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + g * BYTES;
        Raw r;
        r.d = *reinterpret_cast<const unsigned short*>(b);
        unsigned w[5];  // qh, then qs: contiguous
        q_ld2w<5>(b + 2, w);
        r.qh = w[0];
        QUNROLL
        for (int i = 0; i < 4; ++i) r.qs[i] = w[i + 1];
        return r;
    }
    static QDEV void decode(const Raw& r, int, float* y) {
        const float d = qh2f(r.d);
        QUNROLL
        for (int j = 0; j < 16; ++j) {
            const unsigned q = q_byte(r.qs, j);
            const unsigned h0 = ((r.qh >> j) << 4) & 0x10u;
            const unsigned h1 = (r.qh >> (j + 12)) & 0x10u;
            y[j] = (float)((int)((q & 0xFu) | h0) - 16) * d;
            y[j + 16] = (float)((int)((q >> 4) | h1) - 16) * d;
        }
    }
};

// d (f16), qs[32] (int8)
template <>
struct QBlock<QT_Q8_0> {
    static constexpr int QK = 32;
    static constexpr int BYTES = 34;
    struct Raw {
        unsigned short d;
        unsigned qs[8];
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + g * BYTES;
        Raw r;
        r.d = *reinterpret_cast<const unsigned short*>(b);
        q_ld2w<8>(b + 2, r.qs);
        return r;
    }
    static QDEV void decode(const Raw& r, int, float* y) {
        const float d = qh2f(r.d);
        QUNROLL
        for (int j = 0; j < 32; ++j) y[j] = (float)(signed char)q_byte(r.qs, j) * d;
    }
};

// d, dmin (f16), scales[12] (6-bit scale and min per sub-block), qs[128]: sub-block s is the low
// (s even) or high (s odd) nibbles of qs[32*(s/2) .. +32)
template <>
struct QBlock<QT_Q4_K> {
    static constexpr int QK = 256;
    static constexpr int BYTES = 144;
    struct Raw {
        unsigned dm;  // d | dmin << 16
        unsigned sc[3];
        unsigned qs[8];
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + (g >> 3) * BYTES;
        const int s = g & 7;
        const unsigned* h = reinterpret_cast<const unsigned*>(b);
        Raw r;
        r.dm = h[0];
        r.sc[0] = h[1];
        r.sc[1] = h[2];
        r.sc[2] = h[3];
        q_ld32(b + 16 + 32 * (s >> 1), r.qs);
        return r;
    }
    static QDEV void decode(const Raw& r, int g, float* y) {
        const int s = g & 7;
        unsigned sc, m;
        q_scale_min_k4(r.sc, s, sc, m);
        const float d1 = qh2f((unsigned short)(r.dm & 0xFFFFu)) * (float)sc;
        const float m1 = qh2f((unsigned short)(r.dm >> 16)) * (float)m;
        const int shift = 4 * (s & 1);
        QUNROLL
        for (int l = 0; l < 32; ++l) y[l] = d1 * (float)((q_byte(r.qs, l) >> shift) & 0xFu) - m1;
    }
};

// d, dmin (f16), scales[12] as Q4_K, qh[32] (bit s of qh[l]: 5th bit of sub-block s's element
// l), qs[128] as Q4_K
template <>
struct QBlock<QT_Q5_K> {
    static constexpr int QK = 256;
    static constexpr int BYTES = 176;
    struct Raw {
        unsigned dm;  // d | dmin << 16
        unsigned sc[3];
        unsigned qh[8];
        unsigned qs[8];
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + (g >> 3) * BYTES;
        const int s = g & 7;
        const unsigned* h = reinterpret_cast<const unsigned*>(b);
        Raw r;
        r.dm = h[0];
        r.sc[0] = h[1];
        r.sc[1] = h[2];
        r.sc[2] = h[3];
        q_ld32(b + 16, r.qh);
        q_ld32(b + 48 + 32 * (s >> 1), r.qs);
        return r;
    }
    static QDEV void decode(const Raw& r, int g, float* y) {
        const int s = g & 7;
        unsigned sc, m;
        q_scale_min_k4(r.sc, s, sc, m);
        const float d1 = qh2f((unsigned short)(r.dm & 0xFFFFu)) * (float)sc;
        const float m1 = qh2f((unsigned short)(r.dm >> 16)) * (float)m;
        const int shift = 4 * (s & 1);
        QUNROLL
        for (int l = 0; l < 32; ++l) {
            const unsigned q =
                ((q_byte(r.qs, l) >> shift) & 0xFu) + (((q_byte(r.qh, l) >> s) & 1u) << 4);
            y[l] = d1 * (float)q - m1;
        }
    }
};

// ql[128], qh[64], scales[16] (int8), d (f16, byte 208). Half n (128 elements), quarter k:
// element l < 32 is nibble k/2 of ql[64n + 32(k&1) + l], high bits (qh[32n + l] >> 2k) & 3,
// minus 32, times d * scales[8n + 2k + l/16]
template <>
struct QBlock<QT_Q6_K> {
    static constexpr int QK = 256;
    static constexpr int BYTES = 210;
    struct Raw {
        unsigned ql[8];
        unsigned qh[8];
        unsigned short sc;  // scales[8n + 2k], scales[8n + 2k + 1]
        unsigned short d;
    };
    static QDEV Raw load(const unsigned char* row, int g) {
        const unsigned char* b = row + (g >> 3) * BYTES;
        const int n = (g & 7) >> 2, k = g & 3;
        const unsigned char* ql = b + 64 * n + 32 * (k & 1);
        const unsigned char* qh = b + 128 + 32 * n;
        Raw r;
        q_ld2w<8>(ql, r.ql);
        q_ld2w<8>(qh, r.qh);
        r.sc = *reinterpret_cast<const unsigned short*>(b + 192 + 8 * n + 2 * k);
        r.d = *reinterpret_cast<const unsigned short*>(b + 208);
        return r;
    }
    static QDEV void decode(const Raw& r, int g, float* y) {
        const int k = g & 3;
        const float d = qh2f(r.d);
        const float d0 = d * (float)(signed char)(r.sc & 0xFFu);  // l < 16
        const float d1 = d * (float)(signed char)(r.sc >> 8);     // l >= 16
        const int lo = 4 * (k >> 1), hi = 2 * k;
        QUNROLL
        for (int l = 0; l < 32; ++l) {
            const unsigned ql = (q_byte(r.ql, l) >> lo) & 0xFu;
            const unsigned qh = (q_byte(r.qh, l) >> hi) & 3u;
            const int q = (int)(ql | (qh << 4)) - 32;
            y[l] = (l < 16 ? d0 : d1) * (float)q;
        }
    }
};
