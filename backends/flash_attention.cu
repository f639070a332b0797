// Prompt attention on tensor cores, flash-style. Appended, as text, after kernels.cu (ld, st,
// f2h, f2b, visible, PDL_ENTRY are in scope).
//
// k_flash_attn<TQ, T, DH, BK>: out (n, H, DH) f32 = softmax(q k^T * scale, masked) v for a
// prompt (or a prompt chunk over what the cache already holds), K and V in a 16-bit cache of
// type T (f16 or bf16; the tensor cores' inputs), head dim DH for both. One block: 64 query
// tokens of one query head, 4 warps of 16 tokens each; keys in tiles of BK rows.
//
// Per key tile: the tile's positions decide first whether any query of the block sees any of
// its keys (causal: the tiles after the block's last query are skipped, half the work of a
// prompt; windows: the tiles before); K and V rows go to shared memory with 16-byte
// asynchronous copies (empty cache rows, kpos < 0, and rows past m are zero-filled: a masked
// probability times a stale value would still be NaN if the value were); S = Q K^T on mma.sync m16n8k16 with f32
// accumulation; the mask and an online softmax in registers (base 2: scale * log2 e is folded
// into Q before it is rounded to T); P rounded to T is the A operand of O += P V as it sits in
// the accumulator's registers (the m16n8 accumulator of two key groups of 8 is the m16k16 A
// fragment), V's B fragments come transposed by ldmatrix. A row's sum of P stays per thread
// until the end (every thread of a row rescales by the same factor).
//
// Numerics against the f32 reference: Q and P are rounded to T (K and V already are), the
// products and sums are f32. A query with no visible key gets 0, as k_attention.

#define FA_WARPS 4
#define FA_BQ (16 * FA_WARPS)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800

__device__ __forceinline__ unsigned fa_smem(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void fa_copy16(void* dst, const void* src, bool keep) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(fa_smem(dst)), "l"(src),
                 "r"(keep ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void fa_ldsm(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p))
                 : "memory");
}
__device__ __forceinline__ void fa_ldsm_t(unsigned* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p))
                 : "memory");
}
__device__ __forceinline__ unsigned fa_pack(float a, float b, const half_t*) {
    return (unsigned)f2h(a) | ((unsigned)f2h(b) << 16);
}
__device__ __forceinline__ unsigned fa_pack(float a, float b, const bf16_t*) {
    return (unsigned)f2b(a) | ((unsigned)f2b(b) << 16);
}
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, const unsigned* b, const half_t*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void fa_mma(float* c, const unsigned* a, const unsigned* b, const bf16_t*) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// rows j0.. j0 + BK of one kv head of a cache (m, Hk, DH) into shared memory (row stride DH +
// 8), 16 bytes per copy, as one commit group; rows whose position is empty (kpos < 0, or past
// m) are zero-filled
template <int DH, int BK, typename T>
__device__ __forceinline__ void fa_load_tile(unsigned short* dst, const T* src, const int* skp,
                                             int j0, int Hk, int hk) {
    constexpr int CH = DH / 8;  // 16-byte chunks of a row
    for (int i = threadIdx.x; i < BK * CH; i += blockDim.x) {
        const int r = i / CH, ch = i - r * CH;
        const bool keep = skp[r] >= 0;
        const i64 at = ((i64)(keep ? j0 + r : 0) * Hk + hk) * DH + ch * 8;
        fa_copy16(dst + r * (DH + 8) + ch * 8, src + at, keep);
    }
    asm volatile("cp.async.commit_group;");
}

#endif

template <typename TQ, typename T, int DH, int BK>
__global__ void __launch_bounds__(FA_WARPS * 32)
    k_flash_attn(const TQ* q, const T* k, const T* v, const int* qpos, const int* kpos, float* out,
                 int n, int H, int Hk, int m, float scale2, int window, int prefix) {
    PDL_ENTRY();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int LD = DH + 8;  // row stride in shared memory (16-bit elements): +16 bytes puts
                                // the 8 rows an ldmatrix reads on different banks
    constexpr int NT = BK / 8;  // key groups of 8 in a tile (S's accumulator tiles)
    constexpr int DT = DH / 8;  // output column groups of 8 (O's accumulator tiles)
    extern __shared__ uint4 fa_raw[];  // uint4: 16-byte aligned, as ldmatrix and cp.async need
    unsigned short* fa_buf = reinterpret_cast<unsigned short*>(fa_raw);
    unsigned short* sq = fa_buf;             // FA_BQ x LD
    unsigned short* sk = sq + FA_BQ * LD;    // BK x LD
    unsigned short* sv = sk + BK * LD;       // BK x LD
    __shared__ int skp[BK];
    __shared__ int qrange[2];
    const T* tag = nullptr;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int h = blockIdx.y, hk = h / (H / Hk), q0 = blockIdx.x * FA_BQ;
    if (threadIdx.x == 0) {
        qrange[0] = 0x7fffffff;
        qrange[1] = -1;
    }
    for (int i = threadIdx.x; i < FA_BQ * DH / 2; i += blockDim.x) {
        const int r = i / (DH / 2), d = 2 * (i - r * (DH / 2));
        float x0 = 0.f, x1 = 0.f;
        if (q0 + r < n) {
            const i64 at = ((i64)(q0 + r) * H + h) * DH + d;
            x0 = ld(q, at) * scale2;
            x1 = ld(q, at + 1) * scale2;
        }
        *reinterpret_cast<unsigned*>(sq + r * LD + d) = fa_pack(x0, x1, tag);
    }
    const int r0 = warp * 16 + g;  // this thread's rows of the block: r0 and r0 + 8
    const int qp0 = q0 + r0 < n ? qpos[q0 + r0] : -1;
    const int qp1 = q0 + r0 + 8 < n ? qpos[q0 + r0 + 8] : -1;
    // the warp's and the block's query positions (rows past n see nothing)
    int wmin = 0x7fffffff, wmax = -1;
    if (qp0 >= 0) wmin = min(wmin, qp0), wmax = max(wmax, qp0);
    if (qp1 >= 0) wmin = min(wmin, qp1), wmax = max(wmax, qp1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, o));
        wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, o));
    }
    __syncthreads();
    if (lane == 0) {
        atomicMin(&qrange[0], wmin);
        atomicMax(&qrange[1], wmax);
    }
    __syncthreads();
    const int bmin = qrange[0], bmax = qrange[1];

    float o[DT][4];
#pragma unroll
    for (int t = 0; t < DT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
    float mx0 = neg_inf(), mx1 = neg_inf(), l0 = 0.f, l1 = 0.f;

    // prefix: no key this block's queries see lies past row bmax (AttentionParams.prefix_rows),
    // so the tiles after it are not even visited
    const int m_end = prefix ? min(m, bmax + 1) : m;
    for (int j0 = 0; j0 < m_end; j0 += BK) {
        __syncthreads();  // every warp is done with the last tile's K and V
        bool seen = false;
        if (threadIdx.x < BK) {
            const int j = j0 + threadIdx.x;
            const int kp = j < m ? kpos[j] : -1;
            skp[threadIdx.x] = kp;
            seen = kp >= 0 && kp <= bmax && (window == 0 || bmin - kp < window);
        }
        if (!__syncthreads_or(seen)) continue;  // no query of the block sees this tile
        fa_load_tile<DH, BK>(sk, k, skp, j0, Hk, hk);  // K, then V: two commit groups
        fa_load_tile<DH, BK>(sv, v, skp, j0, Hk, hk);
        // does any of this warp's queries see any key of the tile?
        bool mine = false;
        for (int b = lane; b < BK; b += 32) {
            const int kp = skp[b];
            mine |= kp >= 0 && kp <= wmax && (window == 0 || wmin - kp < window);
        }
        mine = __any_sync(0xffffffffu, mine);
        asm volatile("cp.async.wait_group 1;" ::: "memory");
        __syncthreads();  // K is in
        float s[NT][4];
        if (mine) {
#pragma unroll
            for (int t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                unsigned a[4];
                fa_ldsm(a, sq + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kk * 16 + 8 * (lane >> 4));
#pragma unroll
                for (int t = 0; t < NT; t += 2) {
                    unsigned b[4];
                    fa_ldsm(b, sk + (t * 8 + (lane & 7) + 8 * (lane >> 4)) * LD + kk * 16 + 8 * ((lane >> 3) & 1));
                    fa_mma(s[t], a, b, tag);
                    fa_mma(s[t + 1], a, b + 2, tag);
                }
            }
            float bm0 = neg_inf(), bm1 = neg_inf();
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int kp = skp[t * 8 + 2 * c + e];
                    if (!visible(kp, qp0, window)) s[t][e] = neg_inf();
                    if (!visible(kp, qp1, window)) s[t][2 + e] = neg_inf();
                    bm0 = fmaxf(bm0, s[t][e]);
                    bm1 = fmaxf(bm1, s[t][2 + e]);
                }
#pragma unroll
            for (int x = 1; x <= 2; x <<= 1) {
                bm0 = fmaxf(bm0, __shfl_xor_sync(0xffffffffu, bm0, x));
                bm1 = fmaxf(bm1, __shfl_xor_sync(0xffffffffu, bm1, x));
            }
            const float n0 = fmaxf(mx0, bm0), n1 = fmaxf(mx1, bm1);
            // rows that have seen no key yet keep max -inf: factor 1, probabilities 0
            const float c0 = n0 == neg_inf() ? 1.f : exp2f(mx0 - n0);
            const float c1 = n1 == neg_inf() ? 1.f : exp2f(mx1 - n1);
            const float z0 = n0 == neg_inf() ? 0.f : n0, z1 = n1 == neg_inf() ? 0.f : n1;
            mx0 = n0;
            mx1 = n1;
            l0 *= c0;
            l1 *= c1;
#pragma unroll
            for (int t = 0; t < DT; ++t) {
                o[t][0] *= c0;
                o[t][1] *= c0;
                o[t][2] *= c1;
                o[t][3] *= c1;
            }
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                s[t][0] = exp2f(s[t][0] - z0);
                s[t][1] = exp2f(s[t][1] - z0);
                s[t][2] = exp2f(s[t][2] - z1);
                s[t][3] = exp2f(s[t][3] - z1);
                l0 += s[t][0] + s[t][1];
                l1 += s[t][2] + s[t][3];
            }
        }
        asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();  // V is in
        if (mine) {
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
                const unsigned a[4] = {fa_pack(s[2 * kk][0], s[2 * kk][1], tag),
                                       fa_pack(s[2 * kk][2], s[2 * kk][3], tag),
                                       fa_pack(s[2 * kk + 1][0], s[2 * kk + 1][1], tag),
                                       fa_pack(s[2 * kk + 1][2], s[2 * kk + 1][3], tag)};
#pragma unroll
                for (int t = 0; t < DT; t += 2) {
                    unsigned b[4];
                    fa_ldsm_t(b, sv + (kk * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + t * 8 + 8 * (lane >> 4));
                    fa_mma(o[t], a, b, tag);
                    fa_mma(o[t + 1], a, b + 2, tag);
                }
            }
        }
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int t = 0; t < DT; ++t) {
        const int d = t * 8 + 2 * c;
        if (q0 + r0 < n)
            *reinterpret_cast<float2*>(out + ((i64)(q0 + r0) * H + h) * DH + d) =
                make_float2(o[t][0] * i0, o[t][1] * i0);
        if (q0 + r0 + 8 < n)
            *reinterpret_cast<float2*>(out + ((i64)(q0 + r0 + 8) * H + h) * DH + d) =
                make_float2(o[t][2] * i1, o[t][3] * i1);
    }
#endif
}
