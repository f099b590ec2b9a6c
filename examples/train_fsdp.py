"""Train a LoRA adapter with FSDP2 on N processes: ``torchrun --nproc-per-node N examples/train_fsdp.py``.

The flow of torchtune's LoRA recipe, on graphlora's emitted graph:

1. build the model on the meta device (no memory), inject the adapter there;
2. ``graphlora.distributed.shard``: ``fully_shard`` per decoder block and at the root;
3. ``graphlora.distributed.materialize``: allocate each rank's shards, fill them from one full
   state dict (here a seeded random model; for a checkpoint, a ``safetensors`` file read with
   ``mmap`` on every rank);
4. train: only the adapter's parameters require grad; their gradients are reduce-scattered;
5. ``graphlora.distributed.save_adapter``: rank 0 writes the adapter in PEFT's layout, which
   ``PeftModel.from_pretrained`` or ``graphlora.inject(model, path)`` read at any world size.

CPU (gloo) or GPU (nccl, one GPU per process), picked from what is there. A tiny Llama by default
(``--hidden 4096 --layers 8`` for a 7B-shaped one).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import graphlora
from graphlora import distributed as gd


def main() -> None:
    parser = argparse.ArgumentParser(description="FSDP2 LoRA training with graphlora")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="lora-fsdp")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 128) * 4,
                         max_position_embeddings=max(args.seq, 128))
    # the full weights every rank copies its shards from (a checkpoint read with mmap in real use)
    torch.manual_seed(0)
    weights = gd.full_state_dict(LlamaForCausalLM(config))

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    gm = graphlora.inject(model, graphlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gd.shard(gm)
    gd.materialize(gm, device, weights)  # adapters not in `weights`: PEFT's init (A random, B zero)
    if rank == 0:
        gm.print_trainable_parameters()

    gm.train()
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # each rank its own rows (one batch, learnt by heart)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    for step in range(args.steps):
        logits = gm(input_ids=ids).logits  # the inject-time signature: compute the loss from the logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach()
        dist.all_reduce(value)
        if rank == 0:
            print(f"step {step}: loss {float(value) / world:.4f}", flush=True)

    written = gd.save_adapter(gm, args.out)  # every rank gathers; rank 0 writes
    if written:
        print(f"saved the adapter (PEFT format) to {written}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
