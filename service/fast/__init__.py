"""The speed layer: fused replacements for the code a run would otherwise run, each checked
against that code on the run's own model, device and dtypes before it is installed, scoped
to the run, and undone after training, so evaluation and the export run stock code.

Triton kernels only from compute capability 8.0 and where a C compiler can build their
launchers (service.fast.policy): trl's SFT loss projects through the LM head in chunks,
without the full logits, with a Triton kernel where it can run; elsewhere (a T4, the
spotlora image, which ships no compiler) it takes trl's own PyTorch path.

What runs on every GPU, a T4 included, with no Triton and no CUDA toolkit:
- rms_norm: PyTorch's F.rms_norm, one fused kernel each way on CUDA, instead of the five
  elementwise passes of the models' Python forward over an fp32 copy of the hidden states.
- rotary, swiglu: one kernel each way, compiled at first use through NVRTC (which builds for
  the GPU at hand, service.fast.nvrtc), in place of five to eight kernels and their
  intermediate tensors. CUDA only; the CPU keeps the models' own code.
- lora: the LoRA update of a 4-bit layer as one addmm into the base layer's output.
- lm_head_loss: trl's PyTorch fold of the LM-head loss through two compiled kernels, where
  Triton cannot run.
training.fused_kernels: "off" installs none, "require" refuses a run where any falls back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog

from service.errors import ManifestError
from service.fast import logprob, lora, rms_norm, rotary, swiglu
from service.fast.policy import Policy
from service.fast.probe import Fallback

log = structlog.get_logger(__name__)

# In the order they are installed: the LoRA update before the MLPs whose probe goes through it.
# (The benchmarks leave some out by filtering this, to measure what each one is worth.)
REPLACEMENTS = (rms_norm, lora, rotary, swiglu, logprob)
NAMES = tuple(r.NAME for r in REPLACEMENTS)
_ATTRIBUTE = "spotlora_fused"  # the report, on the model it describes


@dataclass
class Report:
    """What a run's speed layer did: for run.json (`kernels`) and the metrics."""

    mode: str
    installed: dict[str, int] = field(default_factory=dict)  # replacement: modules (or 1)
    fallbacks: dict[str, str] = field(default_factory=dict)  # expected, not installed: why
    not_applicable: dict[str, str] = field(default_factory=dict)  # nothing to replace: why
    triton: bool = False  # whether trl's Triton LM-head loss kernel runs
    policy: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "installed": dict(self.installed),
            "fallbacks": dict(self.fallbacks),
            "not_applicable": dict(self.not_applicable),
            "triton_loss": self.triton,
            "policy": dict(self.policy),
        }

    def counts(self) -> dict[str, int]:
        """Modules using each replacement: 0 for one not installed."""
        return {name: self.installed.get(name, 0) for name in NAMES}


def fuse(model: Any, policy: Policy) -> Report:
    """Install every replacement that applies to this model and passes its probe; the report
    says what was installed, what fell back and why. With mode "require", a fallback undoes
    the rest and fails the run (exit 2) naming it."""
    report = Report(mode=policy.mode, policy=policy.facts())
    report.triton = logprob.use_triton(policy)  # in every mode: a failing Triton is no option
    for replacement in REPLACEMENTS:
        name = replacement.NAME
        off = "training.fused_kernels: off" if policy.mode == "off" else None
        why = off or replacement.applies(model, policy)
        if why:
            report.not_applicable[name] = why
            continue
        try:
            report.installed[name] = replacement.install(model, policy)
        except Exception as err:  # a Fallback, or anything else: the model's own code stays
            why = str(err) if isinstance(err, Fallback) else f"{type(err).__name__}: {err}"
            report.fallbacks[name] = why.splitlines()[0]
            log.warning("fused_kernel_fell_back", kernel=name, reason=report.fallbacks[name])
    setattr(model, _ATTRIBUTE, report)
    log.info("fused_kernels", mode=policy.mode, triton_loss=report.triton, **report.counts())
    if policy.mode == "require" and report.fallbacks:
        uninstall(model)
        named = "; ".join(f"{name}: {why}" for name, why in report.fallbacks.items())
        raise ManifestError(
            f"spec.training.fused_kernels: require, but {named} (set it to auto to train "
            "without them)"
        )
    return report


def report(model: Any) -> Report | None:
    """The report fuse() left on this model, if it was fused."""
    found = getattr(model, _ATTRIBUTE, None)
    return found if isinstance(found, Report) else None


def uninstall(model: Any) -> None:
    """Every replacement undone: the model's modules back to their own forwards, the
    modeling modules' and trl's functions and flag as they were. Safe to call twice, or on a
    model never fused."""
    for replacement in reversed(REPLACEMENTS):
        replacement.uninstall(model)
    log.info("fused_kernels_uninstalled")
