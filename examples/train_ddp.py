"""Train a LoRA adapter with DDP on N processes: ``torchrun --nproc-per-node N examples/train_ddp.py``.

``DistributedDataParallel(gm)`` works on the emitted module as it is: the base is frozen, so DDP
registers and all-reduces the active adapter's parameters only. Choose the trainable adapters
before wrapping (DDP fixes its parameter list then) and save on one rank. CPU (gloo) or GPU (nccl).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import graphlora


def main() -> None:
    parser = argparse.ArgumentParser(description="DDP LoRA training with graphlora")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--out", default="lora-ddp")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)  # same base weights on every rank (DDP also broadcasts rank 0's)
    model = LlamaForCausalLM(config).to(device)
    gm = graphlora.inject(model, graphlora.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gm.train()
    ddp = DistributedDataParallel(gm, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-3)
    gen = torch.Generator().manual_seed(rank)  # each rank its own rows (one batch, learnt by heart)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    for step in range(args.steps):
        loss = ddp(input_ids=ids, labels=ids).loss  # any signature the model takes: each is traced once
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach()
        dist.all_reduce(value)
        if rank == 0:
            print(f"step {step}: loss {float(value) / world:.4f}", flush=True)
    if rank == 0:
        gm.save_pretrained(args.out)
        print(f"saved the adapter (PEFT format) to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
