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


# What a checkpoint records of the libraries that wrote it, and those whose major.minor must
# match to resume it: their optimizer, scheduler, RNG and trainer-state files are read back by
# the same libraries, and a minor release may change them (new fields, another RNG stream, a
# renamed state key). A patch release only fixes bugs in them.
CHECKPOINT_LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes")
RESUME_MUST_MATCH = ("torch", "transformers", "peft", "trl")


def checkpoint_versions() -> dict[str, str]:
    return {name: package_version(name) for name in CHECKPOINT_LIBRARIES}


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def resume_differences(recorded: dict[str, str]) -> tuple[list[str], list[str]]:
    """(what refuses the resume, what differs but is safe) between a checkpoint's recorded
    versions and this process's, one 'name: then -> now' line each."""
    refused, safe = [], []
    for name, now in checkpoint_versions().items():
        then = recorded.get(name)
        if then is None or then == now:
            continue
        line = f"{name} {then} then, {now} now"
        if name in RESUME_MUST_MATCH and _major_minor(then) != _major_minor(now):
            refused.append(line)
        else:
            safe.append(line)
    return refused, safe
