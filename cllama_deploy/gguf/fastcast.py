"""float32 → float16 with ggml's own vectorized converter (F16C/AVX), through the llama.cpp library that
llama-cpp-python ships.

numpy's ``astype(float16)`` converts one value at a time (~130 M values/s); ggml's
``ggml_cpu_fp32_to_fp16`` uses the CPU's conversion instructions and is ~8× faster. Both round to
nearest, ties to even, so the bytes are identical (tests/gguf/test_convert.py checks it). When the
library or the symbol is missing, numpy is used.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=1)
def _converter():
    try:
        import llama_cpp  # noqa: F401 - loads libggml-base, which libggml-cpu needs

        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"))
        fn = lib.ggml_cpu_fp32_to_fp16
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    return fn


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float16 array (round to nearest even, like numpy)."""
    if x.dtype == np.float16:
        return np.ascontiguousarray(x)
    fn = _converter()
    src = np.ascontiguousarray(x, dtype=np.float32)
    if fn is None or src.size == 0:
        return src.astype(np.float16)
    out = np.empty(src.shape, dtype=np.float16)
    fn(src.ctypes.data, out.ctypes.data, src.size)  # ctypes releases the GIL during the call
    return out
