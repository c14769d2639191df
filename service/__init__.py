"""spotlora: QLoRA fine-tuning as a preemption-safe batch job."""

__version__ = "0.1.0"
