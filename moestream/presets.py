"""Configs of famous MoE models for `moestream plan`, written from their public model cards and
config.json files, so a user can plan before downloading anything. transformers builds each on the
meta device, so parameter counts come from the real architecture, not from a formula of ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    hub_id: str
    model_type: str
    config: dict
    experts_format: str  # how upstream ships the routed experts
    dense_format: str  # how upstream ships the rest
    card: str  # what the model card says, to check our count against
    aliases: tuple[str, ...] = field(default=())


_DSV3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
             num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
             num_experts_per_tok=8, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
             kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4,
             routed_scaling_factor=2.5, tie_word_embeddings=False)
_KIMI = {**_DSV3, "vocab_size": 163840, "num_attention_heads": 64, "num_key_value_heads": 64,
         "first_k_dense_replace": 1, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
         "routed_scaling_factor": 2.827}


def _qwen35_layers(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(n)]


PRESETS: dict[str, Preset] = {
    "deepseek-v3": Preset("deepseek-ai/DeepSeek-V3", "deepseek_v3", _DSV3, "fp8", "fp8",
                          "671B total, 37B active (plus a 14B MTP module not used for decoding)",
                          ("deepseek-r1", "deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1")),
    "deepseek-v4-flash": Preset("deepseek-ai/DeepSeek-V4-Flash", "deepseek_v4", {}, "fp4", "fp8",
                                "284B total, 13B active; 43 MoE layers, 256 routed + 1 shared, top-6",
                                ("deepseek-ai/DeepSeek-V4-Flash",)),
    "deepseek-v4-pro": Preset("deepseek-ai/DeepSeek-V4-Pro", "deepseek_v4",
                              dict(hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61,
                                   num_attention_heads=128, n_routed_experts=384, q_lora_rank=1536, layer_types=None),
                              "fp4", "fp8", "1.6T total, 49B active; 61 MoE layers, 384 routed + 1 shared, top-6",
                              ("deepseek-ai/DeepSeek-V4-Pro",)),
    "kimi-k2": Preset("moonshotai/Kimi-K2-Instruct", "deepseek_v3", _KIMI, "fp8", "fp8",
                      "1T total, 32B active; 384 experts, top-8", ("moonshotai/Kimi-K2-Instruct",)),
    "kimi-k2.5": Preset("moonshotai/Kimi-K2.5", "deepseek_v3", _KIMI, "int4", "bf16",
                        "1T total, 32B active; experts INT4 (group 32), text backbone of Kimi K2",
                        ("moonshotai/Kimi-K2.5",)),
    "qwen3-30b-a3b": Preset("Qwen/Qwen3-30B-A3B", "qwen3_moe",
                            dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                 num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                 num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False),
                            "bf16", "bf16", "30.5B total, 3.3B active", ("Qwen/Qwen3-30B-A3B",)),
    "qwen3-235b-a22b": Preset("Qwen/Qwen3-235B-A22B", "qwen3_moe",
                              dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                                   moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64,
                                   num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                   tie_word_embeddings=False),
                              "bf16", "bf16", "235B total, 22B active", ("Qwen/Qwen3-235B-A22B",)),
    "qwen3.5-397b-a17b": Preset("Qwen/Qwen3.5-397B-A17B", "qwen3_5_moe_text",
                                dict(vocab_size=248320, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32,
                                     num_key_value_heads=2, head_dim=256, num_experts=512, num_experts_per_tok=10,
                                     moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
                                     linear_num_key_heads=16, linear_num_value_heads=64,
                                     layer_types=_qwen35_layers(60)),
                                "bf16", "bf16", "397B total, 17B active; 512 experts, 10 routed + 1 shared",
                                ("Qwen/Qwen3.5-397B-A17B",)),
    "gpt-oss-120b": Preset("openai/gpt-oss-120b", "gpt_oss",
                           dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                                num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                                num_experts_per_tok=4),
                           "mxfp4", "bf16", "117B total, 5.1B active; MXFP4 experts", ("openai/gpt-oss-120b",)),
    "glm-4.5": Preset("zai-org/GLM-4.5", "glm4_moe",
                      dict(vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                           num_hidden_layers=92, first_k_dense_replace=3, n_routed_experts=160, n_shared_experts=1,
                           num_experts_per_tok=8, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                           partial_rotary_factor=0.5, tie_word_embeddings=False),
                      "bf16", "bf16", "355B total, 32B active", ("zai-org/GLM-4.5",)),
    "mixtral-8x7b": Preset("mistralai/Mixtral-8x7B-v0.1", "mixtral",
                           dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                num_experts_per_tok=2),
                           "bf16", "bf16", "46.7B total, 12.9B active", ("mistralai/Mixtral-8x7B-v0.1",)),
}


def find_preset(name: str) -> Preset | None:
    key = name.lower()
    for pid, p in PRESETS.items():
        if key == pid or key in (a.lower() for a in p.aliases):
            return p
    return None


def preset_config(p: Preset):
    from transformers import AutoConfig

    return AutoConfig.for_model(p.model_type, **p.config)
