"""``graphlora demo``: the main job, end to end on a small model, offline, in under a minute.

1. build a small Llama from its config (or load ``--model DIR``, a local checkpoint);
2. inject LoRA into every linear but the head; print the sites table;
3. fine-tune adapter ``succ`` on a synthetic task (next token = token + 1) with a progress bar;
4. add adapter ``pred`` (next token = token - 1), train it, switch between the two;
5. show that ``disable_adapters()`` gives the base model's outputs exactly;
6. draw the modules view (where the adapters sit) to an SVG file.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import LoraConfig, inject
from .module import AdaptedGraphModule

__all__ = ["run_demo", "small_llama"]


def small_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (hidden 64, vocab 64) built from its config: no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def _load(model_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()


def _task(shift: int, vocab: int) -> Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]:
    def batch(gen: torch.Generator, size: int = 16, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, vocab, (size, length), generator=gen)
        return ids, (ids + shift) % vocab

    return batch


def _accuracy(gm: AdaptedGraphModule, batch, gen: torch.Generator) -> float:
    ids, target = batch(gen, 64)
    with torch.no_grad():
        pred = gm(input_ids=ids).logits.argmax(-1)
    return (pred == target).float().mean().item()


def _train(gm: AdaptedGraphModule, name: str, batch, steps: int, gen: torch.Generator, lr: float) -> list[float]:
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    gm.train()
    bar = tqdm(range(steps), desc=f"training '{name}'", unit="step", ncols=90)
    for _ in bar:
        ids, target = batch(gen)
        logits = gm(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    gm.eval()
    return losses


def _write_svg(gm: AdaptedGraphModule, path: str) -> str:
    """Step 6: the modules view of ``gm`` as an SVG (graphlora.viz); returns the absolute path."""
    from .viz import export_graph

    return str(export_graph(gm, path, view="modules").resolve())


def run_demo(
    model_dir: str | None = None, steps: int = 120, seed: int = 0, lr: float = 1e-2,
    svg: str | None = "graphlora-demo-modules.svg",
) -> dict:
    """Run the demo; returns the numbers it printed (for tests). ``svg=None`` skips the picture."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = _load(model_dir) if model_dir else small_llama(seed)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    source = model_dir or "a 2-layer Llama built from LlamaConfig (random weights)"
    print(f"graphlora demo on {source}")

    probe = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        base_logits = model(input_ids=probe, use_cache=False).logits

    t0 = time.perf_counter()
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    gm = inject(model, config, adapter_name="succ")
    print(f"traced and injected in {time.perf_counter() - t0:.2f}s; sites:")
    print(gm.sites_table())
    gm.print_trainable_parameters()
    with torch.no_grad():
        same = torch.equal(gm(input_ids=probe).logits, base_logits)
    print(f"outputs right after injection equal the base model bit for bit: {same}")

    gen = torch.Generator().manual_seed(seed + 1)
    succ, pred = _task(+1, vocab), _task(-1, vocab)
    losses_succ = _train(gm, "succ", succ, steps, gen, lr)
    print(f"'succ' loss {losses_succ[0]:.3f} -> {losses_succ[-1]:.3f}")

    gm.add_adapter("pred", config)
    losses_pred = _train(gm, "pred", pred, steps, gen, lr)
    print(f"'pred' loss {losses_pred[0]:.3f} -> {losses_pred[-1]:.3f}")

    code_before = gm.code
    table = {}
    for active in ("succ", "pred"):
        gm.set_adapter(active)
        table[active] = (_accuracy(gm, succ, gen), _accuracy(gm, pred, gen))
    print("\naccuracy by active adapter (switching rewrites no graph):")
    print(f"  {'active':<8}{'task +1':>10}{'task -1':>10}")
    for active, (a, b) in table.items():
        print(f"  {active:<8}{a:>10.1%}{b:>10.1%}")

    gm.disable_adapters()
    with torch.no_grad():
        disabled = gm(input_ids=probe).logits
    gm.enable_adapters()
    exact = torch.equal(disabled, base_logits)
    print(f"\ndisable_adapters() reproduces the base model's logits exactly: {exact}")
    print(f"graph code unchanged by set_adapter / disable_adapters: {gm.code == code_before}")

    svg_path = _write_svg(gm, svg) if svg else None
    if svg_path:
        print(f"modules view (where the adapters sit) written to {svg_path}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return {
        "svg": svg_path,
        "identity_at_injection": same,
        "loss_succ": (losses_succ[0], losses_succ[-1]),
        "loss_pred": (losses_pred[0], losses_pred[-1]),
        "accuracy": table,
        "disable_exact": exact,
        "code_unchanged": gm.code == code_before,
        "module": gm,
    }
