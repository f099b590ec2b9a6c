"""Two processes on gloo: DDP and FSDP2 (``graphlora.distributed.shard``) against one process.

One ``torch.distributed.run`` launch of this file on 2 ranks. Rank 0 first trains a
single-process reference (the global batch of 4 rows, 3 SGD steps; no collective involved), then
both ranks train from the same initial state on 2 rows each: a DDP run, and an FSDP2 run from a
meta-device inject (``shard``, ``materialize`` from the full state dict). Losses (each rank's
mean, averaged across ranks: the global batch's mean) must equal the reference's, and so must
the adapters each run saves. The saved adapters then load across world sizes: the reference's
(world 1) into the FSDP shards, the FSDP run's (world 2) into one unsharded module; both must give
the reference's logits.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import tiny_llama, token_ids  # noqa: E402

STEPS = 3
LR = 0.5
ROWS = 4
SEQ = 7
TIMEOUT = 240


def _config():
    from graphlora import LoraConfig

    # random A and B (init_lora_weights=False), so every step moves both
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)


def _loss(gm, ids: torch.Tensor) -> torch.Tensor:
    logits = gm(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, params, ids: torch.Tensor, reduce=None) -> list[float]:
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if reduce is not None:
            reduce(value)
        losses.append(float(value))
    return losses


def _adapter_files(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------- the worker (one rank)


def _worker(work: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import graphlora
    from graphlora import distributed as gd

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    everything = token_ids(ROWS, SEQ)
    ids = everything.chunk(world)[rank]
    results = {}

    def mean(t: torch.Tensor) -> None:
        dist.all_reduce(t)
        t.div_(world)

    gm = graphlora.inject(tiny_llama(), _config())
    gm.train()
    initial = os.path.join(work, "initial.pt")
    if rank == 0:  # the reference: one process, the global batch, no process group involved
        torch.save(gm.state_dict(), initial)
        results["ref"] = _train(gm, [p for p in gm.parameters() if p.requires_grad], everything)
        results["ref_trainable"] = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
        gm.save_pretrained(os.path.join(work, "ref"))
        gm.eval()
        results["ref_logits"] = gm(input_ids=everything).logits.detach()
        gm.train()
    dist.barrier()
    start = torch.load(initial)

    # DDP over the emitted module as it is
    gm.load_state_dict(start)
    ddp = DistributedDataParallel(gm)
    results["ddp"] = _train(ddp, [p for p in gm.parameters() if p.requires_grad], ids, mean)
    results["ddp_grads"] = sorted(n for n, p in gm.named_parameters() if p.grad is not None)
    if rank == 0:
        gm.save_pretrained(os.path.join(work, "ddp"))
    dist.barrier()
    plain = gm

    # FSDP2: meta-device inject, shard per block, materialize from the full state dict
    with torch.device("meta"):
        model = tiny_llama()
    gm = graphlora.inject(model, _config())
    gd.shard(gm)
    results["sharded"] = sorted(n for n, p in gm.named_parameters()
                                if type(p.data).__name__ == "DTensor" and p.to_local().shape[0] < p.shape[0])
    results["names"] = sorted(n for n, _ in gm.named_parameters())
    gd.materialize(gm, "cpu", start)
    gm.train()
    seen = []

    def inside_block_1(module, args) -> None:  # while block 1 runs: its weights gathered, block 0's sharded again
        w1, w0 = (gm.get_submodule(f"model.layers.{i}.self_attn.q_proj").weight for i in (1, 0))
        seen.append((type(w1).__name__, tuple(w1.shape), type(w0).__name__))

    hook = gm.get_submodule("block_region_1").body.register_forward_pre_hook(inside_block_1)
    results["fsdp_trainable"] = sorted(n for n, p in gm.named_parameters() if p.requires_grad)
    results["fsdp"] = _train(gm, [p for p in gm.parameters() if p.requires_grad], ids, mean)
    results["fsdp_grads"] = sorted(n for n, p in gm.named_parameters() if p.grad is not None)
    hook.remove()
    results["inside_block_1"] = seen
    gd.save_adapter(gm, os.path.join(work, "fsdp"))
    # world 1 -> world 2: the reference's adapter (saved by one process) loaded into the shards
    gd.load_adapter(gm, os.path.join(work, "ref"))
    gm.eval()  # grad stays enabled: eval under no_grad runs the banked program, which shard() does not cover
    results["fsdp_logits"] = gm(input_ids=ids).logits.detach()
    if rank == 0:  # world 2 -> world 1: the adapter the 2-rank run saved, loaded by one unsharded module
        plain.load_adapter(os.path.join(work, "fsdp"), "fsdp")
        plain.set_adapter("fsdp")
        plain.eval()
        results["loaded_logits"] = plain(input_ids=everything).logits.detach()
    torch.save(results, os.path.join(work, f"rank{rank}.pt"))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- the test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The 2-rank run's results, rank 0's with the reference's."""
    work = str(tmp_path_factory.mktemp("dist"))
    # graphlora as installed (pip install -e .); the ranks are CPU (gloo) processes: on a machine
    # with fewer GPUs than ranks, FSDP's default mesh would pick CUDA and fail on the second rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), os.path.abspath(__file__), work]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the 2-rank run did not finish in {TIMEOUT} s:\n{str(exc.stderr or '')[-3000:]}")
    assert done.returncode == 0, done.stderr[-6000:]
    results = [torch.load(os.path.join(work, f"rank{r}.pt")) for r in range(2)]
    results[0]["work"] = work
    return results


def _assert_adapters_equal(directory: str, reference_dir: str) -> None:
    mine, ref = _adapter_files(directory), _adapter_files(reference_dir)
    assert sorted(mine) == sorted(ref)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def _close(a, b) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)


def test_ddp_matches_one_process(ranks):
    ref = ranks[0]
    assert ref["ref"][-1] < ref["ref"][0] - 1e-3  # training moved
    for result in ranks:
        _close(result["ddp"], ref["ref"])
        assert result["ddp_grads"] == ref["ref_trainable"]  # adapters get gradients, the frozen base none
    _assert_adapters_equal(os.path.join(ref["work"], "ddp"), os.path.join(ref["work"], "ref"))


def test_fsdp_matches_one_process(ranks):
    ref = ranks[0]
    for result in ranks:
        # every parameter of the blocks and the root is a shard, base and adapters alike
        assert result["sharded"] == result["names"]
        assert result["fsdp_trainable"] == ref["ref_trainable"]
        assert result["fsdp_grads"] == ref["ref_trainable"]
        _close(result["fsdp"], ref["ref"])
        # one all-gather per block: inside block 1 its weight is whole, block 0's a shard again
        assert result["inside_block_1"] == [("Parameter", (32, 32), "DTensor")] * STEPS
    _assert_adapters_equal(os.path.join(ref["work"], "fsdp"), os.path.join(ref["work"], "ref"))


def test_fsdp_adapter_loads_across_world_sizes(ranks):
    ref = ranks[0]
    logits = torch.cat([r["fsdp_logits"] for r in ranks])  # 1 -> 2
    torch.testing.assert_close(logits, ref["ref_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref["loaded_logits"], ref["ref_logits"], rtol=1e-5, atol=1e-5)  # 2 -> 1


if __name__ == "__main__":
    _worker(sys.argv[1])
