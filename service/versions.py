"""Versions of spotlora and the libraries it trains with, from package metadata: learning
them imports none of them."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = (
    "spotlora",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "datasets",
    "accelerate",
)


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{n: package_version(n) for n in PACKAGES}}
