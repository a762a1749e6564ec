"""The fused local-alignment kernel against the float64 PyTorch reference.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1) at
small shapes; with one, the `gpu` cases run the same checks at full shapes.
"""
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import clinvla_engine.kernels.local_align as la  # noqa: E402
from clinvla_engine.kernels.local_align import local_align, local_align_ref  # noqa: E402
from clinvla_engine.losses import local_alignment_scores, use_fused_local  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "gloria_local_golden.json"

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Kernel vs float64 reference. bfloat16 is judged against the reference's own bfloat16 error.
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-5), torch.bfloat16: dict(factor=3.0, atol=0.05)}

# (B_img, B_txt, M regions, T words, D): odd sizes, single rows, GLoRIA's 97 words / 361 regions,
# ClinVLA's 392 (two unmasked 14x14 views), D up to 768
SHAPES_CPU = [
    (2, 3, 7, 5, 8),
    (1, 2, 13, 97, 16),
    (2, 1, 361, 9, 16),
    (1, 1, 392, 12, 32),
    (1, 2, 20, 6, 256),  # the largest D the kernel takes in float32
    (1, 2, 20, 6, 768),  # float32 refuses it (MAX_D_FP32), bfloat16 runs it
    (3, 2, 1, 1, 16),
]
SHAPES_GPU = [  # each distinct (T, D) compiles its own kernels: few shapes, each for a reason
    (16, 16, 392, 128, 128),  # ClinVLA's training shape (two unmasked views)
    (6, 5, 361, 97, 768),  # GLoRIA's shape, odd T and M, the largest D
    (200, 1, 98, 128, 128),  # re-ranking: many candidates, one text
    (4, 4, 2048, 256, 64),  # the largest M and T
]


def make_case(b_img, b_txt, m, t, d, seed, empty_rows=False):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b_img, m, d, generator=g, dtype=torch.float64)
    words = torch.randn(b_txt, t, d, generator=g, dtype=torch.float64)
    word_len = torch.randint(1, t + 1, (b_txt,), generator=g)
    region_len = torch.randint(1, m + 1, (b_img,), generator=g)
    word_mask = (torch.arange(t)[None] < word_len[:, None])[:, torch.randperm(t, generator=g)]
    region_mask = (torch.arange(m)[None] < region_len[:, None])[:, torch.randperm(m, generator=g)]
    if empty_rows:
        word_mask[-1] = False
        region_mask[0] = False
    taus = [torch.tensor(x, dtype=torch.float64) for x in (4.0, 5.0, 10.0)]
    return regions, words, word_mask, region_mask, taus


def reference(regions, words, word_mask, region_mask, taus, upstream):
    """float64 reference (on the GPU when there is one), results on the CPU."""
    r = regions.detach().to(DEVICE, copy=True).requires_grad_(True)
    w = words.detach().to(DEVICE, copy=True).requires_grad_(True)
    ts = [t.detach().to(DEVICE, copy=True).requires_grad_(True) for t in taus]
    s = local_align_ref(r, w, word_mask.to(DEVICE), region_mask.to(DEVICE), *ts)
    (s * upstream.to(DEVICE)).sum().backward()
    return s.detach().cpu(), [r.grad.cpu(), w.grad.cpu()] + [t.grad.cpu() for t in ts]


def run_kernel(regions, words, word_mask, region_mask, taus, upstream, dtype):
    r = regions.to(DEVICE, dtype).requires_grad_(True)
    w = words.to(DEVICE, dtype).requires_grad_(True)
    ts = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in taus]
    s = local_align(r, w, word_mask.to(DEVICE), region_mask.to(DEVICE), *ts)
    assert s.dtype == dtype and s.shape == (regions.shape[0], words.shape[0])
    (s.double() * upstream.to(DEVICE)).sum().backward()
    return s.detach().double().cpu(), [r.grad.double().cpu(), w.grad.double().cpu()] + [
        t.grad.double().cpu() for t in ts]


def assert_close_to_ref(got, ref, dtype, ref_lowp=None, what=""):
    tol = TOL[dtype]
    if dtype == torch.float32:
        scale = ref.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got, ref, atol=tol["atol"] * scale.item(), rtol=tol["rtol"], msg=what)
    else:
        err = (got - ref).abs().max()
        own = (ref_lowp - ref).abs().max()
        bound = tol["factor"] * own + tol["atol"] * ref.abs().max().clamp_min(1.0)
        assert err <= bound, f"{what}: kernel error {err:.3g} > {bound:.3g} (reference's own bf16 error {own:.3g})"


def check(shape, dtype, seed, empty_rows=False):
    regions, words, wm, rm, taus = make_case(*shape, seed=seed, empty_rows=empty_rows)
    why = la.unsupported(shape[3], shape[4], dtype)
    if why is not None:  # the kernel must refuse, naming the fix, and the dispatcher take the reference
        with pytest.raises(ValueError, match="use the reference for this input"):
            run_kernel(regions, words, wm, rm, taus, torch.zeros(shape[0], shape[1], dtype=torch.float64), dtype)
        r, w = regions.to(DEVICE, dtype), words.to(DEVICE, dtype)
        assert not use_fused_local(r, None, w)
        return None
    upstream = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    s_ref, g_ref = reference(regions, words, wm, rm, taus, upstream)
    s_k, g_k = run_kernel(regions, words, wm, rm, taus, upstream, dtype)
    lowp = None
    if dtype != torch.float32:
        # the reference run in bf16 arithmetic gives the error a bf16 computation is entitled to
        r16 = regions.to(DEVICE, dtype).requires_grad_(True)
        w16 = words.to(DEVICE, dtype).requires_grad_(True)
        t16 = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in taus]
        s16 = local_align_ref(r16, w16, wm.to(DEVICE), rm.to(DEVICE), *t16)
        (s16.double() * upstream.to(DEVICE)).sum().backward()
        lowp = (s16.detach().double().cpu(),
                [r16.grad.double().cpu(), w16.grad.double().cpu()] + [t.grad.double().cpu() for t in t16])
    names = ["S", "d regions", "d words", "d tau1", "d tau2", "d tau3"]
    for name, got, ref, low in zip(names, [s_k] + g_k, [s_ref] + g_ref,
                                   [None] * 6 if lowp is None else [lowp[0]] + lowp[1]):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert_close_to_ref(got, ref, dtype, low, f"{name} {shape} {dtype}")
    return s_k


@pytest.mark.parametrize("shape", SHAPES_CPU, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference_float32(shape):
    check(shape, torch.float32, seed=sum(shape))


@pytest.mark.parametrize("shape", SHAPES_CPU, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference_bfloat16(shape):
    check(shape, torch.bfloat16, seed=7 * sum(shape))


def test_empty_rows_give_zero_and_finite_gradients():
    s = check((3, 3, 9, 6, 16), torch.float32, seed=3, empty_rows=True)
    assert (s[:, -1] == 0).all() and (s[0, :] == 0).all()


def test_every_output_element_is_written(monkeypatch):
    """Buffers are poisoned with NaN before the launch: any element a kernel skips shows up."""
    monkeypatch.setattr(la, "_alloc", lambda *shape, device: torch.full(shape, float("nan"), device=device))
    check((2, 3, 37, 21, 24), torch.float32, seed=11)


def test_dispatch_and_fused_switch_against_gloria_golden_values():
    """Both paths against GLoRIA's own numbers (tests/data/gloria_local_golden.json), not each other.

    On CPU tensors the dispatcher must take the reference: float64 in, GLoRIA's S to 1e-10 out (the
    kernel takes only float32 and bfloat16, so float64 at that precision proves which path ran).
    fused=True runs the kernel (in the interpreter here) in float32, within the float32 bound.
    """
    cases = json.loads(GOLDEN.read_text())["cases"]
    for n, case in enumerate(cases):
        regions = torch.tensor(case["regions"], dtype=torch.float64)
        words = torch.tensor(case["words"], dtype=torch.float64)
        wm, rm = torch.tensor(case["word_mask"]), torch.tensor(case["region_mask"])
        golden = torch.tensor(case["S"], dtype=torch.float64)
        assert not use_fused_local(regions, None)
        s_ref = local_alignment_scores(regions, words, wm, rm)
        torch.testing.assert_close(s_ref, golden, atol=1e-10, rtol=1e-10, msg=f"golden case {n}, reference")
        r, w = regions.float().to(DEVICE), words.float().to(DEVICE)
        s_kernel = local_alignment_scores(r, w, wm.to(DEVICE), rm.to(DEVICE), fused=True).double().cpu()
        assert_close_to_ref(s_kernel, golden, torch.float32, what=f"golden case {n}, kernel")


def test_bad_input_is_named(monkeypatch):
    r = torch.randn(2, 5, 8, device=DEVICE)
    w = torch.randn(3, 4, 8, device=DEVICE)
    wm = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="share D"):
        local_align(r, torch.randn(3, 4, 6, device=DEVICE), wm)
    with pytest.raises(ValueError, match=r"word_mask must be \(3, 4\) bool"):
        local_align(r, w, wm[:, :3])
    with pytest.raises(ValueError, match=r"region_mask must be \(2, 5\)"):
        local_align(r, w, wm, torch.ones(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        local_align(r.half(), w.half(), wm)
    with pytest.raises(ValueError, match="float32 only up to D = 256"):
        local_align(torch.randn(2, 5, 300, device=DEVICE), torch.randn(3, 4, 300, device=DEVICE), wm)
    with pytest.raises(ValueError, match="at most 256 words"):
        local_align(r, torch.randn(3, 257, 8, device=DEVICE), torch.ones(3, 257, dtype=torch.bool, device=DEVICE))
    if not ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="needs CUDA tensors, got regions on cpu"):
            local_alignment_scores(r, w, wm, fused=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES_GPU, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_reference_full_shapes(shape, dtype):
    check(shape, dtype, seed=sum(shape))
