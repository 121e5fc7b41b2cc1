"""Families whose experts class does not use transformers' experts interface, made to look as if it did.

Llama 4's `Llama4TextExperts` runs every expert on every token (`bmm` over all experts, the router's
sigmoid score multiplied into each expert's *input*, zero for the experts not chosen, so their
output is exactly zero). We give the module the interface's layout flags (gate_up_proj [E, H, 2I]:
transposed, concatenated) and route its MoE block through the usual (hidden, top_k_index,
top_k_weights) call, with `input_scaled` telling the runtime to scale the input instead of the
output: the chosen experts' terms are computed exactly as transformers computes them, the others
(exact zeros) are skipped.
"""

from __future__ import annotations

import types

import torch


def _llama4_apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return up * self.act_fn(gate)


def _llama4_moe_forward(self, hidden_states: torch.Tensor):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_scores, router_logits = self.router(hidden_states)
    top_k_index = torch.topk(router_logits, self.top_k, dim=1).indices  # the router's own choice
    top_k_weights = router_scores.gather(1, top_k_index)
    out = self.shared_expert(hidden_states)
    out.add_(self.experts(hidden_states, top_k_index, top_k_weights))
    return out, router_logits


def adapt(model: torch.nn.Module) -> None:
    """Give non-interface experts modules the interface's flags and call convention (in place)."""
    for module in model.modules():
        if type(module).__name__ == "Llama4TextMoe":
            e = module.experts
            e.has_gate, e.has_bias, e.has_post_expert_norm = True, False, False
            e.is_transposed, e.is_concatenated = True, True
            e.input_scaled = True  # router score multiplies the expert's input, not its output
            e.moestream_adapted = True
            e._apply_gate = types.MethodType(_llama4_apply_gate, e)
            module.forward = types.MethodType(_llama4_moe_forward, module)
