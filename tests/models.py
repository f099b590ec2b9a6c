"""Tiny test models built from transformers config classes (no downloads) and a plain MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


class FunctionalMLP(nn.Module):
    """A plain MLP: two nn.Linear layers and one functional ``F.linear`` on ``proj.weight``."""

    def __init__(self, d_in: int = 12, d_hidden: int = 20, d_out: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.proj = nn.Linear(d_hidden, d_hidden)  # used only through F.linear below
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))
        return self.fc2(h)


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0, layers: int = 2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=64)
    return BertModel(cfg).eval()


def token_ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def aot_eager_logits(gm, ids: torch.Tensor) -> torch.Tensor:
    """``torch.compile(gm, backend="aot_eager")(input_ids=ids).logits``, compiled afresh (dynamo
    reset before and after: no graph of another test is reused, none is left behind)."""
    torch._dynamo.reset()
    try:
        return torch.compile(gm, backend="aot_eager")(input_ids=ids).logits
    finally:
        torch._dynamo.reset()


def main_output(out):
    """The tensor to compare: logits, last_hidden_state, or the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


def reset_to_default(gms) -> None:
    """Leave each module with only its ``default`` adapter, active, enabled and unmerged."""
    for gm in gms:
        if gm.merged:
            gm.unmerge_adapter()
        for name in list(gm.adapters):
            if name != "default":
                gm.delete_adapter(name)
        gm.set_adapter("default")
        gm.enable_adapters()


def randomize_b(gm, adapter=None, seed: int = 0, std: float = 0.1) -> None:
    """Give ``adapter``'s (all adapters' when ``None``) ``lora_B`` random values: non-zero adapters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, branch in gm.graphlora.branches(adapter):
            branch.lora_B.weight.copy_(torch.randn(branch.lora_B.weight.shape, generator=gen) * std)


def tiny_mixtral(seed: int = 0, layers: int = 2, experts: int = 4):
    """A tiny Mixtral (top-2 routing, 3-D expert weights ``gate_up_proj`` / ``down_proj``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        num_local_experts=experts, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def tiny_qwen2_moe(seed: int = 0, layers: int = 2, experts: int = 4):
    """A tiny Qwen2-MoE (routed experts with 3-D weights, plus a shared expert and its gate)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, num_experts=experts,
                         num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen2MoeForCausalLM(cfg).eval()
