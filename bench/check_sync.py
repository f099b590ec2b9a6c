"""Check (GPU) that serving calls make no host-device synchronization and time their issue on the host."""
import sys, time, warnings
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import torch, graphlora
from bench_gpu import build
from bench_serving import LORA, randomize
dev = torch.device("cuda")
base, cfg = build(False, dev, torch.bfloat16)
gm = graphlora.inject(base, graphlora.LoraConfig(**LORA)); randomize(gm, "default", 0); gm.eval()
x = torch.randint(0, cfg.vocab_size, (8, 16), device=dev)
big = torch.randint(0, cfg.vocab_size, (4, 512), device=dev)
with torch.no_grad():
    for fn, label in ((lambda: base(input_ids=x, use_cache=False), "base"), (lambda: gm(input_ids=x), "graphlora 8x16"), (lambda: gm(input_ids=big), "graphlora 4x512")):
        for _ in range(3): fn()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fn()
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        print(label, "sync warnings:", len(w), [str(m.message)[:120] for m in w[:3]], flush=True)
        # host time to issue, no sync at the end
        ts = []
        for _ in range(30):
            torch.cuda.synchronize(); t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        ts.sort(); print(label, "issue ms median", round(ts[15]*1e3, 3), "min", round(ts[0]*1e3, 3), flush=True)
