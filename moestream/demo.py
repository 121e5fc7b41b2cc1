"""`moestream demo`: models that need no download.

- The bundled tiny-moe: a small Qwen3-MoE trained on Python's standard library
  (scripts/train_tiny_moe.py), shipped in the package; it writes Python-looking code.
- `--random`: a random-weight Qwen3-MoE-shaped checkpoint with ~1.2 GB of experts, several times
  the expert cache it then runs with, built once on this machine, so a fresh install can see
  experts stream at volume. Its text is meaningless: the weights are random.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import shutil
import sys
import sysconfig
from pathlib import Path

import torch

from .stores import home

# ~1.2 GB of bf16 experts: 12 layers x 32 experts x 3 MiB, top-4.
DEMO_SHAPE = dict(
    hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, num_hidden_layers=12,
    num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4,
    max_position_embeddings=4096, tie_word_embeddings=False, initializer_range=0.02,
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_texts(files: int) -> list[str]:
    """The first `files` top-level modules of Python's standard library: text every machine has."""
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:files]
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 4096, files: int = 40,
                    chat_template: str | None = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained on `texts` (default: stdlib files), with a small chat template
    unless `chat_template` is None (a model never trained on chats should not get one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts if texts is not None else stdlib_texts(files), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=chat_template)


def build_checkpoint(out: Path, shape: dict | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     router_std: float = 1.0) -> Path:
    """Save a random Qwen3-MoE checkpoint with transformers' own classes (written atomically)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **(shape or DEMO_SHAPE))
    model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype)
    with torch.no_grad():  # routers with spread-out logits, so tokens pick different experts as in trained models
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, router_std)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, max_shard_size="500MB")
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def bundled_model() -> Path:
    """The trained tiny-moe checkpoint shipped inside the package."""
    from importlib.resources import files

    path = Path(str(files("moestream") / "data" / "tiny-moe"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the bundled tiny-moe model is missing from this installation; "
                                "reinstall moestream, or train it with scripts/train_tiny_moe.py")
    return path


def demo_paths() -> tuple[Path, Path]:
    root = home() / "demo"
    return root / "checkpoint", root / "store"


def ensure_random_store(rebuild: bool = False, progress: bool = True) -> Path:
    """Build (once) the random demo checkpoint and its store; returns the store path."""
    from .convert import convert

    ckpt, store = demo_paths()
    if rebuild:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    if not (ckpt / "config.json").is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if progress:
            print(f"building the demo checkpoint (random weights, ~1.2 GB of experts) in {ckpt}", file=sys.stderr,
                  flush=True)
        # In a child process, so the memory it takes is not in this run's peak RSS.
        proc = multiprocessing.get_context("spawn").Process(target=build_checkpoint, args=(ckpt,))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"building the demo checkpoint failed (exit code {proc.exitcode})")
    if not (store / "store.json").is_file():
        convert(str(ckpt), store, force=True, progress=progress)
    return store
