"""GLoRIA local alignment: loop vs vectorised reference vs SDPA formulation vs the fused kernel.

For each shape, in one run: forward and forward+backward time and peak extra memory of
* ``gloria loop``: GLoRIA's structure (a Python loop over texts, batched bmm over images);
* ``vectorised fp32`` / ``vectorised bf16``: clinvla_engine's chunked PyTorch reference;
* ``sdpa bf16``: the region softmax and context through scaled_dot_product_attention with the
  word-softmax logits as an additive mask (PyTorch's fused attention for half of the work);
* ``gram fp32``: ``local_align_gram``, the same function from the kernels' per-word statistics
  (u = sum alpha a, |c|^2 = alpha^T R R^T alpha) without the contexts: the path off the kernel;
* ``kernel fp32`` / ``kernel bf16``: clinvla_engine.kernels.local_align (CUDA only).
The loss is the local alignment loss (cross-entropy both ways over S). The floor is the
algorithmic FLOPs (forward 4 P M T D, backward 8 P M T D for P image-text pairs) at the peak rate
measured here by a large bf16 matrix product. Plus re-ranking one text against 10,000 candidates.

    python -m benchmarks.bench_local_align [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import Bench, run_main
from clinvla_engine.kernels.local_align import local_align_gram, unsupported
from clinvla_engine.losses import local_alignment_loss_from_scores, local_alignment_scores_ref

GPU_SHAPES = [  # (B, T words, M regions, D)
    (96, 128, 98, 128),
    (96, 128, 392, 128),
    (48, 97, 361, 768),
    (256, 128, 98, 128),
]
# the last: the demo's training step (batch 32, ~48 content words, two views of 4 x 4 patches, E = 128)
CPU_SHAPES = [(16, 32, 49, 64), (8, 97, 98, 128), (32, 48, 32, 128)]
# re-ranking: one text against K candidate studies, (K, T, M, D); tools/gpu_compile_check.py compiles
# the kernels for GPU_SHAPES and RERANK_SHAPE_GPU
RERANK_SHAPE_GPU = (10_000, 128, 392, 128)
RERANK_SHAPE_CPU = (500, 32, 98, 64)
TAU = (4.0, 5.0, 10.0)


def gloria_loop(regions, words, word_mask, region_mask):
    """GLoRIA's local_loss structure: for each text, all images at once with bmm (region mask
    applied as in our semantics so every variant computes the same S)."""
    tau1, tau2, tau3 = TAU
    b = regions.shape[0]
    cols = []
    for i in range(words.shape[0]):
        w = words[i][word_mask[i]]  # (T_i, D)
        wb = w.unsqueeze(0).expand(b, -1, -1)  # (B, T_i, D)
        attn = torch.bmm(regions, wb.transpose(1, 2))  # (B, M, T_i)
        attn = attn.softmax(dim=2) * tau1
        attn = attn.masked_fill(~region_mask[:, :, None], float("-inf")).softmax(dim=1)
        ctx = torch.bmm(attn.transpose(1, 2), regions)  # (B, T_i, D)
        cos = F.cosine_similarity(wb, ctx, dim=2, eps=1e-8)
        cols.append(torch.logsumexp(tau2 * cos, dim=1))
    return tau3 * torch.stack(cols, dim=1)


def sdpa_scores(regions, words, word_mask, region_mask):
    tau1, tau2, tau3 = TAU
    bi, m, d = regions.shape
    bt, t, _ = words.shape
    a = torch.einsum("kmd,itd->kimt", regions, words)  # (Bi, Bt, M, T)
    a = a.masked_fill(~word_mask[None, :, None, :], float("-inf"))
    logits = (a.float().softmax(dim=-1) * tau1).transpose(2, 3)  # (Bi, Bt, T, M)
    logits = logits.masked_fill(~region_mask[:, None, None, :], float("-inf")).to(regions.dtype)
    v = regions[:, None].expand(bi, bt, m, d)
    q = torch.zeros(bi, bt, t, 1, device=regions.device, dtype=regions.dtype)
    kk = torch.zeros(bi, bt, m, 1, device=regions.device, dtype=regions.dtype)
    ctx = F.scaled_dot_product_attention(q, kk, v, attn_mask=logits)  # (Bi, Bt, T, D)
    cos = F.cosine_similarity(ctx, words[None], dim=-1, eps=1e-8)
    z = (tau2 * cos).masked_fill(~word_mask[None], float("-inf"))
    return tau3 * torch.logsumexp(z.float(), dim=-1)


def make_inputs(b, t, m, d, device, dtype):
    g = torch.Generator().manual_seed(0)
    regions = torch.randn(b, m, d, generator=g).to(device, dtype).requires_grad_(True)
    words = torch.randn(b, t, d, generator=g).to(device, dtype).requires_grad_(True)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    word_mask = (torch.arange(t)[None] < lengths[:, None]).to(device)
    region_mask = torch.ones(b, m, dtype=torch.bool, device=device)
    return regions, words, word_mask, region_mask


def measured_peak_tflops(device) -> float:
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ a
        end.record()
        end.synchronize()
        return 10 * 2 * 8192**3 / (start.elapsed_time(end) * 1e-3) / 1e12
    import time

    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    peak = measured_peak_tflops(device)
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    bench = Bench("local_align", args.out, repeat=(5 if args.quick else 20) if gpu else 3,
                  params={"peak_tflops_measured": peak, "device": str(device)})
    variants = [
        ("gloria loop fp32", gloria_loop, torch.float32),
        ("vectorised fp32", lambda *x: local_alignment_scores_ref(*x, *TAU), torch.float32),
        ("vectorised bf16", lambda *x: local_alignment_scores_ref(*x, *TAU), torch.bfloat16),
        ("sdpa bf16", sdpa_scores, torch.bfloat16),
        # the same function from the per-word statistics (the dispatcher's path off the kernel)
        ("gram fp32", lambda *x: local_align_gram(*x, *TAU), torch.float32),
    ]
    if gpu:
        from clinvla_engine.kernels.local_align import local_align

        variants += [
            ("kernel fp32", lambda *x: local_align(*x, *TAU), torch.float32),
            ("kernel bf16", lambda *x: local_align(*x, *TAU), torch.bfloat16),
        ]
    for b, t, m, d in shapes:
        pairs = b * b
        fwd_flops = 4.0 * pairs * m * t * d
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3 * fwd_flops)):
            name = f"B={b} T={t} M={m} D={d} {mode}"
            with bench.case(name, device=str(device), flops=flops, floor_ms=flops / (peak * 1e12) * 1e3,
                            floor_note=f"{flops / 1e9:.1f} GFLOP at {peak * 1e3:.0f} GFLOP/s") as case:
                for label, fn, dtype in variants:
                    if label.startswith("kernel") and unsupported(t, d, dtype):
                        # e.g. float32 at D = 768: local_alignment_scores takes the reference there
                        print(f"  {name} | {label}: not run ({unsupported(t, d, dtype)})")
                        continue
                    inputs = make_inputs(b, t, m, d, device, dtype)

                    def run(fn=fn, inputs=inputs, mode=mode):
                        if mode == "fwd":
                            with torch.no_grad():
                                fn(*inputs)
                        else:
                            s = fn(*inputs)
                            local_alignment_loss_from_scores(s.float()).backward()

                    case.run(label, run, baseline=label == "gloria loop fp32")
                    del inputs
    # re-ranking: one text against many candidate studies, forward only
    k, t, m, d = RERANK_SHAPE_GPU if gpu else RERANK_SHAPE_CPU
    flops = 4.0 * k * m * t * d
    with bench.case(f"rerank 1 text x {k} studies M={m} D={d}", device=str(device), flops=flops,
                    floor_ms=flops / (peak * 1e12) * 1e3) as case:
        rows = [("vectorised bf16", lambda *x: local_alignment_scores_ref(*x, *TAU), torch.bfloat16)]
        if gpu:
            from clinvla_engine.kernels.local_align import local_align

            rows.append(("kernel bf16", lambda *x: local_align(*x, *TAU), torch.bfloat16))
        for label, fn, dtype in rows:
            g = torch.Generator().manual_seed(1)
            regions = torch.randn(k, m, d, generator=g).to(device, dtype)
            words = torch.randn(1, t, d, generator=g).to(device, dtype)
            wm = torch.ones(1, t, dtype=torch.bool, device=device)

            def run(fn=fn, regions=regions, words=words, wm=wm):
                with torch.no_grad():
                    fn(regions, words, wm, None)

            case.run(label, run, baseline=label.startswith("vectorised"))
    bench.finish()


if __name__ == "__main__":
    run_main(main)
