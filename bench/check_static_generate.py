"""Static-cache generate against PEFT for OPT and Qwen2 (plain and left-padded batches), on whatever torch and
transformers this machine has: the device image (torch 2.11, transformers 5.17) traces OPT differently from CI.
Run from the repository root: ``python bench/check_static_generate.py``. Prints one line per case."""
import sys, warnings, torch
sys.path.insert(0, "tests")
warnings.filterwarnings("ignore")
import peft, graphlora
import test_static_decode as t
for arch in ("opt", "qwen2"):
    for padded in (False, True):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=t.MODELS[arch][1], init_lora_weights=False)
        ref = peft.get_peft_model(t._build(arch), config).eval()
        ref.save_pretrained(f"/tmp/optgen-{arch}")
        gm = graphlora.inject(t._build(arch), f"/tmp/optgen-{arch}").eval()
        ids, mask = t._prompt(padded)
        kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": t.PAD, "cache_implementation": "static"}
        try:
            with torch.no_grad():
                ours = gm.generate(input_ids=ids, attention_mask=mask, **kw)
                theirs = ref.generate(input_ids=ids, attention_mask=mask, **kw)
            print(arch, "padded" if padded else "plain", "static generate equal to PEFT:", torch.equal(ours, theirs))
        except Exception as exc:
            print(arch, "padded" if padded else "plain", "static generate FAILED:", type(exc).__name__, str(exc)[:300])
