"""Deltas saved by deltatune before the package moved into rooms (commit 7078e84), with the logits they gave."""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)  # as tests/conftest.py: bit-identity holds per thread count
from safetensors.torch import save_file
import deltatune
from deltatune.models import tiny_model, tiny_tokenizer
from deltatune.registry import METHODS, build_config

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
tok = tiny_tokenizer()
batch = tok(["the movie was great", "a weak plot"], return_tensors="pt", padding=True)
cases = {}
for arch, kind in [("bert", "classification"), ("llama", "causal-lm")]:
    for method in METHODS:
        torch.manual_seed(0)
        model = tiny_model(arch, kind)
        options = {"add_missing": True} if method == "bitfit" and arch == "llama" else {}
        config = build_config(method, options)
        dm = deltatune.attach(model, config, task="fixture")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in dm.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        dm.eval()
        with torch.no_grad():
            logits = dm(**batch).logits
        name = f"{arch}-{method}"
        dm.save_delta(out / name)
        cases[name] = logits.contiguous()
        print(name, tuple(logits.shape))
save_file(cases, str(out / "logits.safetensors"))
(out / "inputs.json").write_text(json.dumps({"texts": ["the movie was great", "a weak plot"]}))
