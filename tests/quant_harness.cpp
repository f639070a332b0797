// Host harness for backends/quant_blocks.cuh (built and driven by tests/test_quant_blocks.py).
//
// stdin:  int32 type id (ggml), int32 rows, int32 K, then rows * K / QK * BYTES raw block bytes.
// stdout: rows * K float32, decoded piece by piece through QBlock<T>::load + decode, as the
//         CUDA kernels do.
// Exit status 2 for an unknown type id, 1 for any other bad input.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// ---- prelude: what kernels.cu provides to the header under NVRTC -----------------------------
#define QDEV inline
struct uint4 {
    unsigned x, y, z, w;
};

#define QH2F_DEFINED
// IEEE binary16 bits -> float, exact: zeros, subnormals, normals, infinities, NaN (payload kept)
inline float qh2f(unsigned short h) {
    const std::uint32_t sign = (std::uint32_t)(h & 0x8000u) << 16;
    std::uint32_t exp = (h >> 10) & 0x1Fu;
    std::uint32_t man = h & 0x3FFu;
    std::uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  // subnormal: man * 2^-24, normalized
        exp = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

#include "../backends/quant_blocks.cuh"

template <int T>
static int run(int rows, int K) {
    typedef QBlock<T> B;
    if (rows < 0 || K < 0 || K % B::QK != 0) {
        std::fprintf(stderr, "K=%d is not a multiple of %d (or rows=%d < 0)\n", K, B::QK, rows);
        return 1;
    }
    const std::size_t row_bytes = (std::size_t)(K / B::QK) * B::BYTES;
    const std::size_t n_bytes = row_bytes * (std::size_t)rows;
    // uint4 storage: the tensor start is 16-byte aligned, as in GGUF files and device buffers
    std::vector<uint4> storage(n_bytes / sizeof(uint4) + 1);
    unsigned char* data = reinterpret_cast<unsigned char*>(storage.data());
    if (std::fread(data, 1, n_bytes, stdin) != n_bytes) {
        std::fprintf(stderr, "short input: expected %zu bytes of blocks\n", n_bytes);
        return 1;
    }
    // the alignment contract the loads rely on
    const std::uintptr_t align = (B::BYTES % 16 == 0) ? 16 : 2;
    std::vector<float> out((std::size_t)rows * K);
    for (int r = 0; r < rows; ++r) {
        const unsigned char* row = data + row_bytes * r;
        if ((std::uintptr_t)row % align != 0) {
            std::fprintf(stderr, "row %d is not %d-byte aligned\n", r, (int)align);
            return 1;
        }
        for (int g = 0; g < K / 32; ++g) {
            const typename B::Raw raw = B::load(row, g);
            B::decode(raw, g, &out[(std::size_t)r * K + 32 * (std::size_t)g]);
        }
    }
    if (std::fwrite(out.data(), sizeof(float), out.size(), stdout) != out.size()) {
        std::fprintf(stderr, "write failed\n");
        return 1;
    }
    return std::fflush(stdout) == 0 ? 0 : 1;
}

int main() {
    std::int32_t head[3];
    if (std::fread(head, sizeof(std::int32_t), 3, stdin) != 3) {
        std::fprintf(stderr, "expected a 12-byte header: type, rows, K (int32)\n");
        return 1;
    }
    const int type = head[0], rows = head[1], K = head[2];
    switch (type) {
        case QT_Q4_0: return run<QT_Q4_0>(rows, K);
        case QT_Q5_0: return run<QT_Q5_0>(rows, K);
        case QT_Q8_0: return run<QT_Q8_0>(rows, K);
        case QT_Q4_K: return run<QT_Q4_K>(rows, K);
        case QT_Q5_K: return run<QT_Q5_K>(rows, K);
        case QT_Q6_K: return run<QT_Q6_K>(rows, K);
        default:
            std::fprintf(stderr, "unknown quantization type id %d\n", type);
            return 2;
    }
}
