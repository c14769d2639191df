"""The sample models and data that the quickstart and the other tests stand on."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from examples import samples
from service.model import disable_cpu_inference_repack

REPO_ROOT = Path(__file__).resolve().parents[1]


def _bnb_config() -> object:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def _load_4bit(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_bnb_config(), dtype=torch.float32
    )


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return samples.write_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


# --- the tiny model ---------------------------------------------------------------------------


def test_tiny_llama_loads_in_4bit_and_runs_a_forward(tiny_llama: Path) -> None:
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    model = _load_4bit(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    linear4bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 2 * 7  # q, k, v, o, gate, up, down in each of two layers

    batch = tokenizer(["Ship 3 red lamp to Oslo."], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], samples.TINY_LLAMA_VOCAB_SIZE)
    assert torch.isfinite(out.loss)


def test_tiny_llama_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = samples.write_tiny_llama(tmp_path / "a", seed=1)
    b = samples.write_tiny_llama(tmp_path / "b", seed=1)
    c = samples.write_tiny_llama(tmp_path / "c", seed=2)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(a / name) == _digest(b / name), name
    assert _digest(a / "model.safetensors") != _digest(c / "model.safetensors")


def test_tiny_tokenizer_round_trips_and_has_special_tokens(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert tokenizer.eos_token == samples.EOS_TOKEN
    assert tokenizer.pad_token == samples.PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) <= samples.TINY_LLAMA_VOCAB_SIZE
    # Byte-level: text the tokenizer was never trained on must survive, unicode included.
    for text in ["Ship 3 red lamp to Oslo.", "Zürich → 東京, naïve café!\n\ttabs"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_chat_template(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    # The special tokens are single ids, so a completion's end is learnable as one token.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 2


def test_exact_match_leaves_4bit_layers_trainable(tiny_llama: Path) -> None:
    """An evaluation before training must not change the gradients training sees afterwards."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = samples.make_synthetic_rows(4, seed=0)
    batch = tokenizer([samples.alpaca_prompt(r) + r["output"] for r in rows[:2]], padding=True)

    def lora_grads(evaluate_first: bool) -> list[torch.Tensor | None]:
        torch.manual_seed(0)
        model = _load_4bit(tiny_llama)
        if evaluate_first:
            score = samples.exact_match(model, tokenizer, rows, max_new_tokens=4)
            assert 0.0 <= score <= 1.0
        else:
            disable_cpu_inference_repack(model)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        peft_model.train()
        ids = torch.tensor(batch["input_ids"])
        loss = peft_model(
            input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]), labels=ids
        ).loss
        loss.backward()
        return [p.grad for p in peft_model.parameters() if p.requires_grad]

    before, after = lora_grads(False), lora_grads(True)
    assert all(g is not None and g.abs().sum() > 0 for g in after)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b)


# --- the synthetic task -----------------------------------------------------------------------


def test_synthetic_task_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = samples.write_synthetic_task(tmp_path / "a.jsonl", n=50, seed=3)
    b = samples.write_synthetic_task(tmp_path / "b.jsonl", n=50, seed=3)
    c = samples.write_synthetic_task(tmp_path / "c.jsonl", n=50, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_synthetic_rows_are_alpaca_format_and_follow_the_convention(tmp_path: Path) -> None:
    path = samples.write_synthetic_task(tmp_path / "task.jsonl", n=20, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) and v for v in row.values())
    assert samples.task_row(3, "green", "lamp", "Oslo") == {
        "instruction": "Write the warehouse code for this order.",
        "input": "Ship 3 green lamp to Oslo.",
        "output": "Oslo | 3 x lamp | moss",
    }
    assert samples.read_jsonl(path) == rows


def test_synthetic_rows_are_distinct() -> None:
    rows = samples.make_synthetic_rows(2000, seed=0)
    assert len({r["input"] for r in rows}) == len(rows)
    with pytest.raises(ValueError, match="n must be between"):
        samples.make_synthetic_rows(0, seed=0)


def test_split_is_disjoint(tmp_path: Path) -> None:
    train_path, eval_path = samples.write_synthetic_splits(tmp_path, n_train=300, n_eval=40, seed=7)
    train, held_out = samples.read_jsonl(train_path), samples.read_jsonl(eval_path)
    assert (len(train), len(held_out)) == (300, 40)
    assert not {r["input"] for r in train} & {r["input"] for r in held_out}
    with pytest.raises(ValueError, match="eval_rows"):
        samples.split_rows(train, eval_rows=len(train))


def test_alpaca_prompt_matches_stanford_template() -> None:
    with_input = samples.alpaca_prompt({"instruction": "Do X.", "input": "data", "output": ""})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\ndata\n\n### Response:\n"
    )
    no_input = samples.alpaca_prompt({"instruction": "Do X.", "input": "", "output": ""})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )


# --- the real model ---------------------------------------------------------------------------


def smollm2_cache_dir() -> Path:
    """Where the SmolLM2 export is kept between test runs (half a gigabyte, built in ~15 s)."""
    return Path(os.environ.get("SPOTLORA_TEST_CACHE", REPO_ROOT / ".cache")) / "smollm2-135m"


@pytest.mark.slow
def test_smollm2_export_is_a_plain_model_that_loads_in_4bit() -> None:
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    path = samples.export_smollm2(smollm2_cache_dir())
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert samples.export_smollm2(path) == path  # a finished export is reused

    model = _load_4bit(path)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tokenizer = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    disable_cpu_inference_repack(model)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
