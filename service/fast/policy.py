"""What this process can run: the GPU, the torch release, a C compiler for Triton.

Decided once per run, before anything is replaced, from facts that cost no GPU work: every
replacement's `applies` reads it, and the report keeps it, so a run record says why a kernel
was or was not used on the machine it ran on.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["auto", "off", "require"]

# Triton supports nothing below compute capability 8.0 (3.3 dropped Turing; "it may work at
# times" on a T4, slowly, through FMA instead of tensor cores).
TRITON_MIN_CAPABILITY = (8, 0)
# torch.cuda._compile_kernel's NVRTC helpers, which service.fast.nvrtc calls, came in 2.8.
NVRTC_MIN_TORCH = (2, 8)
COMPILER_CHECK_SECONDS = 30
# Triton builds each kernel's launcher as a Python extension: a compiler that cannot find
# Python.h fails at the first step as surely as none at all.
_COMPILER_CHECK_SOURCE = "#include <Python.h>\nint spotlora_check(void) { return 0; }\n"


@dataclass(frozen=True)
class Policy:
    """The facts a run's replacements are chosen by. Dtypes by name: fp32, fp16, bf16."""

    mode: Mode = "auto"
    device: str = "cpu"  # "cpu" or "cuda"
    capability: tuple[int, int] | None = None
    compute_dtype: str = "fp32"  # the matmuls' (autocast's) dtype
    residual_dtype: str = "fp32"  # the frozen unquantized weights', so the hidden states'
    torch_compile: bool = False
    torch_version: tuple[int, int] = (0, 0)
    c_compiler: str | None = None

    def triton(self, trl_has_triton: bool) -> bool:
        """Whether trl's Triton kernels can run here: Triton installed (trl says), a GPU it
        supports, and a compiler for the launchers Triton builds at run time."""
        return (
            trl_has_triton
            and self.device == "cuda"
            and self.capability is not None
            and self.capability >= TRITON_MIN_CAPABILITY
            and self.c_compiler is not None
        )

    def cuda_kernels(self) -> str | None:
        """Why the compiled CUDA kernels cannot be used, or None where they can."""
        if self.device != "cuda":
            return "no CUDA GPU: the models' own code runs on the CPU"
        if self.torch_compile:
            return "training.torch_compile fuses this work itself"
        if self.torch_version < NVRTC_MIN_TORCH:
            return f"torch {'.'.join(map(str, self.torch_version))} has no NVRTC kernel compiler"
        return None

    def facts(self) -> dict[str, object]:
        """For the report: what the choices were made from."""
        return {
            "mode": self.mode,
            "device": self.device,
            "capability": ".".join(map(str, self.capability)) if self.capability else None,
            "compute_dtype": self.compute_dtype,
            "residual_dtype": self.residual_dtype,
            "torch_compile": self.torch_compile,
            "c_compiler": self.c_compiler,
        }


def torch_version() -> tuple[int, int]:
    import torch

    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def c_compiler() -> str | None:
    """The C compiler Triton would use (CC, else gcc, else clang, as Triton looks for it), if
    it builds a file that includes Python.h; None otherwise (the spotlora image ships none)."""
    return _compiler(os.environ.get("CC"), os.environ.get("PATH", ""))


@functools.cache  # once per process and environment: a check runs the compiler
def _compiler(named: str | None, path: str) -> str | None:
    for candidate in [named] if named else ["gcc", "clang"]:
        found = shutil.which(candidate, path=path)
        if found and _builds_an_extension(found):
            return found
    return None


def c_compiler_missing() -> str:
    """Why c_compiler() found none, in words for an error message."""
    named = os.environ.get("CC")
    if named:
        return f"CC={named} does not build a C file that includes Python.h"
    return "no gcc or clang on PATH (CC unset) that builds a C file including Python.h"


def _builds_an_extension(compiler: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "check.c"
        source.write_text(_COMPILER_CHECK_SOURCE)
        include = sysconfig.get_paths()["include"]
        try:
            done = subprocess.run(
                [compiler, "-fsyntax-only", f"-I{include}", str(source)],
                capture_output=True,
                timeout=COMPILER_CHECK_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


def for_run(
    *,
    mode: Mode,
    device: str,
    capability: tuple[int, int] | None,
    compute_dtype: str,
    frozen_dtype: str,
    torch_compile: bool,
) -> Policy:
    """The policy of a run on this machine. `frozen_dtype` is the manifest's
    quantization.frozen_dtype: "compute" keeps the residual stream in the compute dtype."""
    return Policy(
        mode=mode,
        device=device,
        capability=capability,
        compute_dtype=compute_dtype,
        residual_dtype="fp32" if frozen_dtype == "fp32" else compute_dtype,
        torch_compile=torch_compile,
        torch_version=torch_version(),
        c_compiler=c_compiler() if device == "cuda" else None,
    )
