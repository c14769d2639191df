"""CUDA kernels compiled at run time through NVRTC, which builds for the GPU at hand (a T4
included), with no CUDA toolkit.

torch.cuda._compile_kernel asks torch.utils.cpp_extension for the toolkit's include paths,
which raises where there is no CUDA_HOME: the spotlora image, whose CUDA comes from the
nvidia pip wheels (NVRTC's library included, headers not). These sources include no header
(the storage type comes in as T, with load/store to and from float), so this compiles them
with NVRTC directly, with no include path, and loads them through torch's driver helpers.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

TYPES = {  # storage type; float from it; it from float, rounding to nearest even
    "float16": (
        "unsigned short",
        'float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f;',
        'T v; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f)); return v;',
    ),
    "bfloat16": (
        "unsigned short",
        "return __uint_as_float(((unsigned int)v) << 16);",
        "unsigned int u = __float_as_uint(f);"
        " if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);"
        " u += 0x7fffu + ((u >> 16) & 1u); return (T)(u >> 16);",
    ),
    "float32": ("float", "return v;", "return f;"),
}
TYPE_FUNCTIONS = """
__device__ __forceinline__ float load(T v) { LOAD }
__device__ __forceinline__ T store(float f) { STORE }
"""

_COMPILED: dict[tuple[str, Any], Any] = {}
_THREAD = threading.local()


def compiled(source: str, name: str, dtype: Any) -> Any:
    """The CUDA kernel `name` of `source` for tensors of `dtype` (its T, with load() and
    store() to and from float), compiled through NVRTC at first use."""
    import torch

    if not getattr(_THREAD, "context", False):
        # The kernel is launched through the driver API, which needs the device's context
        # current on this thread; the runtime makes it so at the thread's first call, which
        # an autograd worker thread may not have made yet.
        torch.cuda.current_stream().query()
        _THREAD.context = True
    if (name, dtype) not in _COMPILED:
        storage, load, store = TYPES[str(dtype).removeprefix("torch.")]
        code = TYPE_FUNCTIONS.replace("LOAD", load).replace("STORE", store)
        _COMPILED[name, dtype] = compile_kernel(f"typedef {storage} T;\n{code}{source}", name)
    return _COMPILED[name, dtype]


def compile_kernel(source: str, name: str) -> Any:
    """`name` (an extern "C" kernel of `source`, which includes no header) built for this
    process's GPU, as a callable taking grid, block and args like torch's compiled kernels."""
    import torch
    from torch.cuda import _utils

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    binary = _nvrtc_cubin(_utils._get_nvrtc_library(), source, name, props.major, props.minor)
    kernels = _utils._cuda_load_module(binary, [name])
    assert isinstance(kernels, dict)
    return kernels[name]


def _nvrtc_cubin(nvrtc: Any, source: str, name: str, major: int, minor: int) -> bytes:
    def check(result: int) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            nvrtc.nvrtcGetErrorString(result, ctypes.byref(text))
            raise RuntimeError(f"NVRTC: {(text.value or b'error').decode()}")

    program = ctypes.c_void_p()
    check(
        nvrtc.nvrtcCreateProgram(
            ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None
        )
    )
    try:
        options = [f"--gpu-architecture=sm_{major}{minor}".encode()]
        array = (ctypes.c_char_p * len(options))(*options)
        if nvrtc.nvrtcCompileProgram(program, len(options), array) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, text)
            raise RuntimeError(f"NVRTC could not compile {name}: {text.value.decode()}")
        size = ctypes.c_size_t()
        check(nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        binary = ctypes.create_string_buffer(size.value)
        check(nvrtc.nvrtcGetCUBIN(program, binary))
        return binary.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
