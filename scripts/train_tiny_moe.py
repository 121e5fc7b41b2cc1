"""Train the small Qwen3-MoE model that ships with moestream, on Python's own standard library.

Every machine with Python has the corpus, so the model is reproducible anywhere:
    python scripts/train_tiny_moe.py --out moestream/data/tiny-moe
The held-out split is by file (about 1 in 20 files); the script prints and saves the train and
held-out loss and the unigram baseline of the tokenizer on the held-out text.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

import torch

SHAPE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
             norm_topk_prob=True, max_position_embeddings=2048, tie_word_embeddings=False,
             output_router_logits=True, router_aux_loss_coef=0.01)


def corpus_files() -> list[Path]:
    """The standard library's .py files, tests and vendored third-party code left out, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def held_out(path: Path) -> bool:
    return int(hashlib.sha1(path.name.encode()).hexdigest(), 16) % 20 == 0


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def unigram_loss(train: torch.Tensor, test: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the train tokens' add-one unigram."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = torch.log(counts / counts.sum())
    return float(-logp[test].mean())


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, windows: int) -> float:
    model.eval()
    starts = torch.linspace(0, len(data) - seq - 2, windows).long()
    x = torch.stack([data[s : s + seq] for s in starts])
    y = torch.stack([data[s + 1 : s + seq + 1] for s in starts])
    total = 0.0
    for i in range(0, windows, 16):
        logits = model(x[i : i + 16]).logits.float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i : i + 16].reshape(-1),
                                                   reduction="sum").item()
    model.train()
    return total / (windows * seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="moestream/data/tiny-moe")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from moestream.demo import build_tokenizer

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    files = corpus_files()
    train_files = [f for f in files if not held_out(f)]
    test_files = [f for f in files if held_out(f)]
    read = lambda fs: [f.read_text(encoding="utf-8", errors="replace") for f in fs]  # noqa: E731
    train_text, test_text = read(train_files), read(test_files)
    tokenizer = build_tokenizer(train_text, args.vocab, chat_template=None)  # plain code model: no chat
    train, test = encode(tokenizer, train_text), encode(tokenizer, test_text)
    baseline = unigram_loss(train, test, len(tokenizer))
    print(f"corpus: {len(train_files)} train files ({len(train)} tokens), {len(test_files)} held-out files "
          f"({len(test)} tokens); unigram baseline {baseline:.3f} nats/token; {time.time() - t0:.0f} s", flush=True)

    config = Qwen3MoeConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **SHAPE)
    model = Qwen3MoeForCausalLM(config)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    t_train = time.time()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts])
        out = model(x, labels=x)
        out.loss.backward()  # includes the router load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            held = evaluate(model, test, args.seq, 64)
            log.append({"step": step, "train_loss_with_router_aux": float(out.loss.detach()), "held_out_loss": held,
                        "seconds": time.time() - t_train})
            print(f"step {step}/{args.steps}: train (+aux) {float(out.loss.detach()):.3f}, held-out {held:.3f} nats/token, "
                  f"{(time.time() - t_train) / step:.2f} s/step", flush=True)

    train_loss = evaluate(model, train, args.seq, 64)
    held = log[-1]["held_out_loss"]
    out_dir = Path(args.out)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {"train_loss": train_loss, "held_out_loss": held, "unigram_baseline": baseline,
              "parameters": params, "train_tokens": len(train), "held_out_tokens": len(test),
              "train_files": len(train_files), "held_out_files": len(test_files), "args": vars(args),
              "shape": SHAPE, "seconds": time.time() - t0, "torch": torch.__version__,
              "python": sysconfig.get_python_version(), "log": log}
    (tmp / "training.json").write_text(json.dumps(report, indent=1))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"held-out {held:.3f} vs unigram {baseline:.3f} nats/token (train {train_loss:.3f}); "
          f"{params / 1e6:.1f} M parameters; wrote {out_dir} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
