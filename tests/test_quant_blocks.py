"""The CUDA kernels' GGUF block decoders (backends/quant_blocks.cuh), checked on the CPU.

The header is compiled as host C++ (tests/quant_harness.cpp) and decodes random blocks piece by
piece, exactly as the kernels do; the result must equal gguf.quants.dequantize bit for bit.
Both ways of reading 2-byte aligned blocks are built: aligned words shifted into place (the
default) and 2-byte loads (``QLOAD_SHORTS``); rows of 96 elements put blocks at every alignment.
"""

import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

HARNESS = Path(__file__).with_name("quant_harness.cpp")

Q = GGMLQuantizationType
# byte offsets of each type's f16 fields (d, dmin) inside a block
F16_FIELDS = {
    Q.Q4_0: (0,),
    Q.Q5_0: (0,),
    Q.Q8_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}
SIZES = {
    qt: ((256, 512, 4096) if GGML_QUANT_SIZES[qt][0] == 256 else (32, 96, 4096))
    for qt in F16_FIELDS
}
ROWS = 3


@pytest.fixture(scope="module", params=["halves", "words"])
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler to build the host harness")
    exe = tmp_path_factory.mktemp("quant_harness") / "quant_harness"
    define = ["-DQLOAD_SHORTS"] if request.param == "halves" else []
    cmd = [cxx, "-O1", "-std=c++17", "-Wall", "-Werror", *define, "-o", str(exe), str(HARNESS)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr}"
    return exe


def decode(exe: Path, type_id: int, rows: int, k: int, raw: np.ndarray) -> np.ndarray:
    head = struct.pack("<3i", type_id, rows, k)
    done = subprocess.run([str(exe)], input=head + raw.tobytes(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return np.frombuffer(done.stdout, dtype=np.float32).reshape(rows, k)


def random_blocks(qt: GGMLQuantizationType, rows: int, k: int, seed: int) -> np.ndarray:
    """rows * k/QK random blocks, their f16 fields finite: (rows, k/QK * BYTES) uint8."""
    qk, nbytes = GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * (k // qk), nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qt]:
        f16 = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, off : off + 2] = f16.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qt", list(F16_FIELDS), ids=lambda qt: qt.name)
def test_decoders_match_gguf(harness: Path, qt: GGMLQuantizationType) -> None:
    for i, k in enumerate(SIZES[qt]):
        raw = random_blocks(qt, ROWS, k, seed=1000 * int(qt) + i)
        got = decode(harness, int(qt), ROWS, k, raw)
        want = dequantize(raw, qt)
        assert want.dtype == np.float32 and want.shape == (ROWS, k)
        assert np.isfinite(want).all()
        # bit for bit: the decoders follow ggml's reference operation order
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=f"K={k}")


def test_fp16_scale_every_bit_pattern(harness: Path) -> None:
    """qh2f of the host prelude: all 65536 halves (subnormals, infinities, NaN) as Q8_0's d."""
    d = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    blocks = np.zeros((len(d), 34), dtype=np.uint8)
    blocks[:, :2] = d.view(np.uint8).reshape(-1, 2)
    blocks[:, 2:] = 1  # q = 1: y = 1 * d
    got = decode(harness, int(Q.Q8_0), 1, 32 * len(d), blocks.reshape(1, -1))[0, ::32]
    np.testing.assert_array_equal(got, d.view(np.float16).astype(np.float32))


def test_unknown_type_exits_2(harness: Path) -> None:
    done = subprocess.run(
        [str(harness)], input=struct.pack("<3i", 99, 1, 32) + bytes(64), capture_output=True
    )
    assert done.returncode == 2
    assert b"unknown" in done.stderr
