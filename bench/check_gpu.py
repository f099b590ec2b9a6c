"""GPU correctness checks for graphlora's Triton kernels (run on the GPU machine before benchmarking).

Fresh random inputs per check; errors are relative to an fp64 reference; zero gates must give
the base output bit for bit where the base op is cuBLAS's (``lora_switch``), and the fused
``lora_linear`` is compared with cuBLAS's base GEMM; gradients through the custom ops must match
plain autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graphlora.passes import kernels, ops


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_forward() -> None:
    dev = torch.device("cuda")
    worst = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for m, n, k, ranks in [(4096, 4096, 4096, [16]), (4096, 11008, 4096, [16]), (1000, 333, 200, [8, 4]),
                               (3, 4096, 64, [16, 16, 16, 16]), (777, 8192, 520, [4]), (4096, 11008, 4096, [8, 16])]:
            x = torch.randn(m, k, device=dev, dtype=dtype)
            w = torch.randn(n, k, device=dev, dtype=dtype) * k ** -0.5
            bias = torch.randn(n, device=dev, dtype=dtype)
            y = F.linear(x, w)
            a_s = [torch.randn(r, k, device=dev, dtype=dtype) * k ** -0.5 for r in ranks]
            gate = torch.tensor(1.5, device=dev)
            hs = [ops.lora_down(x, a, gate) for a in a_s]
            ref_h = [(x.double() @ a.double().T) * 1.5 for a in a_s]
            worst[("down", dtype, m, n, k)] = max(rel(h, r) for h, r in zip(hs, ref_h))
            bs = [torch.randn(n, r, device=dev, dtype=dtype) * 0.1 for r in ranks]
            low = sum(h.double() @ b.double().T for h, b in zip(hs, bs))
            got = ops.lora_switch(y, hs, bs)
            worst[("switch", dtype, m, n, k)] = rel(got, y.double() + low)
            assert torch.isfinite(got).all()  # the output is a fresh empty tensor: unwritten tiles show here
            zero = ops.lora_switch(y, [torch.zeros_like(h) for h in hs], bs)
            assert torch.equal(zero, y), "zero gates must give the base output exactly"
            for b_ in (None, bias):
                fused = ops.lora_linear(x, w, b_, hs, bs)
                ref = x.double() @ w.double().T + (0 if b_ is None else b_.double()) + low
                worst[("linear" + ("+bias" if b_ is not None else ""), dtype, m, n, k)] = rel(fused, ref)
                assert torch.isfinite(fused).all()
            base0 = ops.lora_linear(x, w, None, [torch.zeros_like(h) for h in hs], bs)
            differ = (base0 != y).float().mean().item()
            path = "fused" if kernels.fused_linear_ok(x, w, None, sum(ranks)) else "cuBLAS + add"
            print(f"lora_linear {path:<13s} {str(dtype):<15s} {m}x{n}x{k}: zero gates differ from cuBLAS "
                  f"in {differ * 100:.3f}% of elements, max {(base0.float() - y.float()).abs().max().item():.2e}")
            if path != "fused":
                assert differ == 0.0
    for key, err in worst.items():
        print(f"{str(key):<60s} rel err vs fp64 {err:.2e}")
        limit = 1e-2 if key[1] != torch.float32 else 1e-5
        assert err < limit, (key, err)


def check_backward() -> None:
    """Autograd through the custom ops (kernel forward, matmul backward) vs plain autograd."""
    dev = torch.device("cuda")
    for n in (256, 8192):
        x = torch.randn(2, 64, 512, device=dev, dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(n, 512, device=dev, dtype=torch.bfloat16) * 0.05).requires_grad_()
        a = (torch.randn(8, 512, device=dev, dtype=torch.bfloat16) * 0.05).requires_grad_()
        b = (torch.randn(n, 8, device=dev, dtype=torch.bfloat16) * 0.05).requires_grad_()
        gate = torch.tensor(2.0, device=dev)
        leaves = (x, w, a, b)

        def grads(fn):
            for t in leaves:
                t.grad = None
            out = fn()
            (out.float() ** 2).sum().backward()
            return [t.grad.clone() for t in leaves]

        got = grads(lambda: ops.lora_linear(x, w, None, [ops.lora_down(x, a, gate)], [b]))
        ref = grads(lambda: F.linear(x, w) + (F.linear(x, a) * gate) @ b.T)
        for name, g, r in zip("xwab", got, ref):
            err = rel(g, r)
            print(f"grad {name} (out {n}) rel err vs plain autograd {err:.2e}")
            assert err < 2e-2, (name, n, err)


def check_moves() -> None:
    """Inject on CPU, then ``.cuda()``; inject on the meta device, then ``to_empty(device="cuda")``:
    the exported graphs' baked devices are retargeted and outputs match the HF model on the GPU."""
    import copy
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    import graphlora

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    real = LlamaForCausalLM(cfg).eval()
    config = graphlora.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"])
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding: no fully masked query row
    gm = graphlora.inject(copy.deepcopy(real), config)
    with torch.no_grad():
        for _, _, b in gm.graphlora.branches():
            b.lora_B.weight.normal_(0, 0.1)
        cpu = gm(input_ids=ids).logits
        gm.cuda()
        assert "device(type='cpu')" not in gm.code
        err = rel(gm(input_ids=ids.cuda()).logits.cpu(), cpu)
        print(f"moved CPU -> CUDA, rel diff vs the CPU output {err:.2e}")
        assert err < 1e-4, err
        with gm.disable_adapter():  # a signature first traced after the move
            base = gm(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
        hf = real.cuda()(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
        err = rel(base, hf)
        print(f"adapters disabled on CUDA (padded mask) vs HF on CUDA: rel diff {err:.2e}")
        assert err < 1e-5, err
        tmp = tempfile.mkdtemp()
        gm.save_adapter(tmp)
        with torch.device("meta"):
            empty = LlamaForCausalLM(cfg).eval()
        meta = graphlora.inject(empty, config)
        meta.to_empty(device="cuda")
        for name, tensor in [*real.named_parameters(), *real.named_buffers()]:
            target = meta.get_parameter(name) if name in dict(meta.named_parameters()) else meta.get_buffer(name)
            target.copy_(tensor)
        meta.load_adapter(tmp, "default")
        for kwargs in ({"input_ids": ids}, {"input_ids": ids, "attention_mask": mask}):
            kwargs = {k: v.cuda() for k, v in kwargs.items()}
            err = rel(meta(**kwargs).logits, gm(**kwargs).logits)
            print(f"meta -> to_empty(cuda) -> weights loaded: rel diff vs CUDA model {err:.2e} ({sorted(kwargs)})")
            assert err < 1e-5, err


def main() -> None:
    dev = torch.device("cuda")
    assert kernels.available(torch.empty(1, device=dev, dtype=torch.bfloat16)), "Triton kernels not available"
    check_forward()
    check_backward()
    check_moves()
    print("kernel and device-move checks passed")


if __name__ == "__main__":
    main()
