"""What every benchmark shares: model shapes, the synthetic data, a random-init model
directory, the T4 emulation and the measured matmul rate."""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

GIB = 1024**3
T4_MEMORY_BYTES = 15 * GIB
SEED = 1234
VOCAB_SIZE = 32000
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")

# Mistral-7B-v0.1's and Llama-3.1-8B's config.json, written out by hand so nothing is
# downloaded.
PRESETS: dict[str, dict[str, Any]] = {
    "mistral-7b": {
        "model_type": "mistral",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
    },
    # A large vocabulary: the LM head is 1.05 B parameters of the 8 B.
    "llama-3.1-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
    },
    # Another architecture of the size: biases on q/k/v, a 152,064-token vocabulary (the
    # embeddings and LM head 1.09 B of the 7.6 B), wider MLP, 28 layers.
    "qwen2.5-7b": {
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
    },
    # Qwen3-8B: no q/k/v biases, RMSNorm on each head's queries and keys, 36 layers, a
    # 151,936-token vocabulary and an untied LM head.
    "qwen3-8b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    # Gemma-2-2B: attention-logit and final-logit soft-capping (eager attention), head_dim 256
    # wider than hidden / heads, four norms a layer, GeGLU, a 256,000-token tied embedding.
    "gemma-2-2b": {
        "model_type": "gemma2",
        "vocab_size": 256000,
        "hidden_size": 2304,
        "intermediate_size": 9216,
        "num_hidden_layers": 26,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    # A quick check of the whole path in seconds; same vocabulary, GQA and MLP shape ratios.
    "small": {
        "model_type": "mistral",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 512,
        "intermediate_size": 1792,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
    },
}

# The same with the LM head tied to the embeddings (one 545 M matrix instead of two).
PRESETS["qwen2.5-7b-tied"] = {**PRESETS["qwen2.5-7b"], "tie_word_embeddings": True}


def model_config(preset: str) -> Any:
    from transformers import AutoConfig

    fields = dict(PRESETS[preset])
    return AutoConfig.for_model(
        fields.pop("model_type"),
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=fields.pop("tie_word_embeddings", False),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        **fields,
    )


def param_count(preset: str) -> int:
    p = PRESETS[preset]
    h, i, n = p["hidden_size"], p["intermediate_size"], p["num_hidden_layers"]
    head = p.get("head_dim", h // p["num_attention_heads"])
    q, kv = head * p["num_attention_heads"], head * p["num_key_value_heads"]
    norms = {"gemma2": 4 * h, "qwen3": 2 * h + 2 * head}.get(p["model_type"], 2 * h)
    per_layer = 2 * h * q + 2 * h * kv + 3 * h * i + norms
    if p["model_type"] == "qwen2":  # biases on q, k and v
        per_layer += q + 2 * kv
    heads = 1 if p.get("tie_word_embeddings") else 2
    return n * per_layer + heads * p["vocab_size"] * h + h


# --------------------------------------------------------------------------- data


def sequence_lengths(count: int, seed: int = SEED) -> list[int]:
    """Alpaca-like lengths: lognormal, median 150 tokens, sigma 0.75, clipped to 32..512."""
    rng = random.Random(seed)
    return [
        min(512, max(32, round(math.exp(rng.gauss(math.log(150), 0.75))))) for _ in range(count)
    ]


def token_rows(count: int, seed: int = SEED) -> list[dict[str, list[int]]]:
    """Pre-tokenized rows (ids never special tokens), so trl does no tokenizing."""
    rng = random.Random(seed + 1)
    first = len(SPECIAL_TOKENS)
    return [
        {"input_ids": [rng.randrange(first, VOCAB_SIZE) for _ in range(n)]}
        for n in sequence_lengths(count, seed)
    ]


def text_rows(count: int, seed: int = SEED) -> list[dict[str, str]]:
    """The same lengths as text for the word-level tokenizer below (one token per word;
    trl adds EOS), for jobs that go through the product's data loader."""
    rng = random.Random(seed + 1)
    first = len(SPECIAL_TOKENS)
    return [
        {"text": " ".join(f"t{rng.randrange(first, VOCAB_SIZE)}" for _ in range(n - 1))}
        for n in sequence_lengths(count, seed)
    ]


def build_tokenizer() -> Any:
    """A word-level tokenizer over the model's 32,000 ids: the benchmark needs real ids and a
    pad/eos token, not real text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL_TOKENS), VOCAB_SIZE)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )


# --------------------------------------------------------------------------- model


def ensure_model_dir(preset: str, path: Path) -> dict[str, float]:
    """A random-init model saved as bf16 safetensors, built on the GPU when there is one
    (seconds, not the minutes a CPU init of 7B takes). Reused when already there."""
    import torch
    from transformers import AutoModelForCausalLM

    if (path / "config.json").is_file():
        return {"model_dir_reused": 1.0}
    start = time.monotonic()
    torch.manual_seed(SEED)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model: Any = AutoModelForCausalLM.from_config(model_config(preset))
        model = model.to(torch.bfloat16)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    built = time.monotonic() - start
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp, max_shard_size="4GB")
    build_tokenizer().save_pretrained(tmp)
    os.replace(tmp, path)
    saved = time.monotonic() - start - built
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {"model_init_seconds": built, "model_save_seconds": saved, "model_bytes": size}


# --------------------------------------------------------------------------- device


def emulate_t4() -> None:
    """A T4's 15 GiB (the caching allocator refuses to go past it in this process) and its
    kernels: its attention kernel, and no Triton, which supports nothing below compute
    capability 8.0, so trl's LM-head loss takes its PyTorch path as on a T4."""
    import torch
    from trl.kernels import chunked_logprob

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_MEMORY_BYTES / total), 0)
    # A T4 (compute capability 7.5) has neither the flash nor cuDNN's attention kernel:
    # under a mask SDPA takes the memory-efficient one there, about half cuDNN's speed.
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    # As if Triton were missing: the run's policy then takes trl's PyTorch path and the
    # compiled fold of service.fast.logprob, as on a T4.
    chunked_logprob._TRITON_AVAILABLE = False


COMPILERS = ("cc", "gcc", "clang")
TOOLKIT_VARIABLES = ("CUDA_HOME", "CUDA_PATH", "CC", "CXX")


def image_environment(bare: Path) -> dict[str, str]:
    """The environment of the spotlora image for a process on a lab machine: no CUDA toolkit
    variables, no compiler variables, and a PATH (`bare`, an empty directory, and python's
    own directory where it holds no C compiler) on which Triton finds no compiler. torch also
    looks for the toolkit in /usr/local/cuda: the process clears that itself
    (`image_conditions`)."""
    import shutil
    import sys

    bare.mkdir(parents=True, exist_ok=True)
    python_dir = str(Path(sys.executable).parent)
    dirs = [str(bare)]
    if not any(shutil.which(cc, path=python_dir) for cc in COMPILERS):
        dirs.insert(0, python_dir)
    env = {k: v for k, v in os.environ.items() if k not in TOOLKIT_VARIABLES}
    env["PATH"] = os.pathsep.join(dirs)
    return env


def image_conditions() -> None:
    """In a process started with image_environment: torch finds no CUDA toolkit either (it
    would find /usr/local/cuda on its own). Fails loudly if a compiler or the toolkit's
    headers are still found, so a figure is never labelled with conditions it did not have."""
    import shutil

    import torch.utils.cpp_extension as extension

    extension.CUDA_HOME = None
    found = [cc for cc in COMPILERS if shutil.which(cc)] + [
        v for v in TOOLKIT_VARIABLES if os.environ.get(v)
    ]
    try:
        extension.include_paths("cuda")
    except OSError:
        pass
    else:
        found.append("the CUDA toolkit's include paths")
    if found:
        raise SystemExit(f"not the image's conditions: {', '.join(found)} found")


def matmul_tflops(dtype_name: str, size: int = 8192, repeats: int = 20) -> float:
    """Dense matmul rate on random data, timed with CUDA events after warm-up."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / seconds / 1e12


def environment() -> dict[str, Any]:
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": round(props.total_memory / GIB, 1),
        "versions": versions,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
