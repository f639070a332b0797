"""What ``engine.model.gguf`` checks beyond a file's structure, on synthetic files
(``tests/gguf_fixtures.py``): hyper-parameters that make no sense, NaN or Inf in a weight, and
strings from the file that would reach a terminal. Each problem is one ``GGUFError`` naming
the file and the key or tensor, or a visible escape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from engine.model.gguf import GGUFError, config_for, open_gguf
from engine.options import Options
from tests.gguf_fixtures import GEMMA3, GEMMA3_TYPES, LLAMA, LLAMA_TYPES, write_model
from tests.test_gguf import expect_error

# -- hyper-parameters that make no sense ---------------------------------------------------------

NAN, INF = float("nan"), float("inf")
NONSENSE = {
    "eps zero": ({"{a}.attention.layer_norm_rms_epsilon": (0.0, V.FLOAT32)}, "epsilon is 0;"),
    "eps negative": (
        {"{a}.attention.layer_norm_rms_epsilon": (-1e-5, V.FLOAT32)},
        "layer_norm_rms_epsilon is -1e-05",
    ),
    "eps nan": ({"{a}.attention.layer_norm_rms_epsilon": (NAN, V.FLOAT32)}, "epsilon is nan"),
    "eps inf": ({"{a}.attention.layer_norm_rms_epsilon": (INF, V.FLOAT64)}, "epsilon is inf"),
    "eps one": (
        {"{a}.attention.layer_norm_rms_epsilon": (1.0, V.FLOAT32)},
        "epsilon is 1; it must be a finite number above 0 and below 1",
    ),
    "rope base zero": ({"{a}.rope.freq_base": (0.0, V.FLOAT32)}, "llama.rope.freq_base is 0;"),
    "rope base negative": ({"{a}.rope.freq_base": (-1e4, V.FLOAT32)}, "freq_base is -10000;"),
    "rope base nan": ({"{a}.rope.freq_base": (NAN, V.FLOAT32)}, "llama.rope.freq_base is nan"),
    "rope base inf": ({"{a}.rope.freq_base": (INF, V.FLOAT32)}, "llama.rope.freq_base is inf"),
    "rope scale negative": ({"{a}.rope.scaling.factor": (-2.0, V.FLOAT32)}, "factor is -2;"),
    "rope scale nan": ({"{a}.rope.scaling.factor": (NAN, V.FLOAT32)}, "factor is nan"),
    "zero heads": ({"{a}.attention.head_count": (0, V.UINT32)}, "head_count is 0"),
    "negative kv heads": ({"{a}.attention.head_count_kv": (-2, V.INT32)}, "head_count_kv is -2"),
    "kv heads above heads": (
        {"{a}.attention.head_count_kv": (8, V.UINT32)},
        "4 heads are not a multiple of 8 kv heads",
    ),
    "zero head dim": ({"{a}.attention.key_length": (0, V.UINT32)}, "key_length is 0"),
    "head dim underivable": (
        {"{a}.attention.key_length": None, "{a}.attention.head_count": (3, V.UINT32)}
        | {"{a}.attention.head_count_kv": (1, V.UINT32)},
        "key_length is missing, and llama.embedding_length 256 is not a multiple of 3 heads",
    ),
    "zero embedding": ({"{a}.embedding_length": (0, V.UINT32)}, "embedding_length is 0"),
    "zero context": ({"{a}.context_length": (0, V.UINT32)}, "llama.context_length is 0"),
    "negative context": ({"{a}.context_length": (-4096, V.INT32)}, "context_length is -4096"),
    "context string": ({"{a}.context_length": ("4k", V.STRING)}, "should be an integer"),
    "zero ffn": ({"{a}.feed_forward_length": (0, V.UINT32)}, "feed_forward_length is 0"),
}


@pytest.mark.parametrize("case", list(NONSENSE))
def test_nonsense_hyperparameters_name_the_key(tmp_path: Path, case: str) -> None:
    meta, needle = NONSENSE[case]
    path = tmp_path / "bad.gguf"
    write_model(path, LLAMA, LLAMA_TYPES, meta=meta)
    msg = expect_error(path, needle)
    assert "metadata llama." in msg


@pytest.mark.parametrize(
    ("meta", "needle"),
    [
        ({"{a}.rope.freq_base_swa": (0.0, V.FLOAT32)}, "gemma3.rope.freq_base_swa is 0;"),
        ({"{a}.rope.freq_base_swa": (NAN, V.FLOAT32)}, "gemma3.rope.freq_base_swa is nan"),
        ({"{a}.attention.sliding_window": (-8, V.INT32)}, "sliding_window is -8"),
        ({"{a}.rope.freq_base": (INF, V.FLOAT32)}, "gemma3.rope.freq_base is inf"),
    ],
)
def test_nonsense_gemma3_hyperparameters(tmp_path: Path, meta: dict, needle: str) -> None:
    path = tmp_path / "bad.gguf"
    write_model(path, GEMMA3, GEMMA3_TYPES, meta=meta)
    expect_error(path, needle)


def test_sensible_hyperparameters_are_read(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    meta = {
        "{a}.rope.freq_base_swa": (5e4, V.FLOAT32),
        "{a}.rope.scaling.factor": (0.0, V.FLOAT32),  # 0: no scaling, as llama.cpp reads it
        "{a}.context_length": (32768, V.UINT32),
    }
    write_model(path, GEMMA3, GEMMA3_TYPES, meta=meta)
    model = open_gguf(path)
    assert (model.config.rope_base_swa, model.config.rope_freq_scale) == (5e4, 1.0)
    assert model.n_ctx_train == 32768 and "context:     32768 tokens" in model.describe()
    path = tmp_path / "scaled.gguf"
    write_model(path, LLAMA, LLAMA_TYPES, meta={"{a}.rope.scaling.factor": (4.0, V.FLOAT32)})
    assert open_gguf(path).config.rope_freq_scale == 0.25


# -- NaN and Inf in weights ----------------------------------------------------------------------


def q8_with_nan_scale(rows: int, cols: int, bad_block: int) -> np.ndarray:
    """Q8_0 bytes of zeros whose block ``bad_block`` has an f16 NaN scale."""
    blocks = np.zeros((rows * cols // 32, 34), np.uint8)
    blocks[:, 0:2] = np.array([0x3C00], np.uint16).view(np.uint8)  # scale 1.0
    blocks[bad_block, 0:2] = np.array([0x7E00], np.uint16).view(np.uint8)  # NaN
    return blocks.reshape(rows, cols // 32 * 34)


@pytest.mark.parametrize(
    ("name", "raw", "row"),
    [
        ("blk.0.attn_norm.weight", (np.full(256, np.nan, np.float32), None, None), 0),
        ("blk.1.ffn_up.weight", (np.full((512, 256), np.inf, np.float16), None, None), 0),
        (
            "blk.0.attn_v.weight",
            (q8_with_nan_scale(128, 256, 8 * 100 + 3), None, T.Q8_0),
            100,
        ),
    ],
)
def test_nan_or_inf_in_a_weight_names_the_tensor(
    tmp_path: Path, name: str, raw: tuple, row: int
) -> None:
    path = tmp_path / "nan.gguf"
    write_model(path, LLAMA, LLAMA_TYPES, raw={name: raw})
    model = open_gguf(path)  # the header is fine: opening (and `info`) still works
    assert model.describe()
    loads = [lambda: model.tensor(name), lambda: model.weights("f16")]
    for backend in ("numpy", "cupy"):  # what the commands load: stored types, kept or decoded
        cfg = config_for(model, Options(backend=backend))
        loads.append(lambda cfg=cfg: model.weights_as(cfg))
    for load in loads:
        with pytest.raises(GGUFError, match="holds NaN or Inf") as e:
            load()
        assert str(e.value).startswith(f"{path}: tensor {name} ") and f"row {row}" in str(e.value)


# -- strings from the file reach a terminal only escaped -----------------------------------------

HOSTILE = "Evil\x1b]0;pwned\x07\x1b[2J\u202emodel\x9b" + "x" * 500


def test_hostile_strings_are_escaped_in_name_describe_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "hostile.gguf"
    meta = {
        "general.name": (HOSTILE, V.STRING),
        "general.description": ("line\nbreak\x1b[31m", V.STRING),
        "general.\x1b[2Jkey": (1, V.UINT32),
    }
    write_model(path, LLAMA, LLAMA_TYPES, meta=meta)
    model = open_gguf(path)
    name = model.config.name
    assert name.startswith("Evil\\x1b]0;pwned\\x07\\x1b[2J\\u202emodel\\x9b") and name.endswith(
        "..."
    )
    assert len(name) < 120
    text = model.describe() + "\n".join(f"{k} = {v}" for k, v in model.metadata().items())
    assert all(c.isprintable() or c == "\n" for c in text)
    listing = model.metadata()
    assert listing["general.description"] == "line\\x0abreak\\x1b[31m"
    assert "general.\\x1b[2Jkey" in listing and listing["general.\\x1b[2Jkey"] == 1


def test_name_not_utf8_is_shown_not_refused(tmp_path: Path) -> None:
    from engine.model.gguf_file import GGUFFile

    path = tmp_path / "latin1.gguf"
    write_model(path, LLAMA, LLAMA_TYPES, meta={"general.name": ("caf\u00e9", V.STRING)})
    data = path.read_bytes().replace("caf\u00e9".encode(), b"caf\xe9\xff")  # same length
    path.write_bytes(data)
    assert GGUFFile(path).fields["general.name"].value == b"caf\xe9\xff"
    assert open_gguf(path).config.name == "caf\\xe9\\xff"
