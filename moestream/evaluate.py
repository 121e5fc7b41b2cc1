"""`moestream eval`: what a lossy format costs, in numbers a user can compare.

Perplexity of the text, and against a reference run (the exact store): mean KL(ref || model) of
the next-token distributions and the share of positions where both pick the same top-1 token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .runtime import StreamedModel


@torch.inference_mode()
def _logprobs(m: StreamedModel, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(m.model(ids.to(m.device)).logits[0].float().cpu(), dim=-1)


def evaluate(m: StreamedModel, text: str, ref: StreamedModel | None = None, window: int = 256,
             max_tokens: int = 4096) -> dict:
    """Scores over non-overlapping windows of `window` tokens (each predicts its own next tokens)."""
    if m.tokenizer is None:
        raise ValueError(f"{m.store.root} has no tokenizer: eval needs one to read the text")
    ids = m.tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the text is shorter than two tokens: nothing to score")
    nll = kl = agree = n = 0.0
    ref_nll = 0.0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor([ids[start : start + window + 1]])
        x, y = chunk[:, :-1], chunk[0, 1:]
        lp = _logprobs(m, x)
        nll += -lp.gather(1, y[:, None]).sum().item()
        if ref is not None:
            rp = _logprobs(ref, x)
            ref_nll += -rp.gather(1, y[:, None]).sum().item()
            kl += (rp.exp() * (rp - lp)).sum().item()
            agree += (rp.argmax(-1) == lp.argmax(-1)).sum().item()
        n += len(y)
    out = {"model": str(m.store.root), "experts_format": m.store.meta["quant"]["experts"], "tokens": int(n),
           "perplexity": math.exp(nll / n)}
    if ref is not None:
        out.update(against=str(ref.store.root), against_format=ref.store.meta["quant"]["experts"], kl=kl / n,
                   top1_agreement=agree / n, against_perplexity=math.exp(ref_nll / n))
    return out
