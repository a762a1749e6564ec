"""The global and local alignment losses against direct transcriptions of their formulas."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clinvla_engine.losses import (
    global_alignment_loss,
    local_alignment_loss,
    local_alignment_scores,
    local_alignment_scores_ref,
)

GOLDEN = Path(__file__).parent / "data" / "gloria_local_golden.json"


def loop_local_scores(regions, words, word_mask, region_mask, tau1, tau2, tau3):
    """A plain loop over images and texts, written from the formula; empty pairs give 0."""
    b_img, b_txt = regions.shape[0], words.shape[0]
    out = torch.zeros(b_img, b_txt, dtype=regions.dtype)
    for k in range(b_img):
        r = regions[k][region_mask[k]]  # (M_k, D)
        for i in range(b_txt):
            e = words[i][word_mask[i]]  # (T_i, D)
            if r.shape[0] == 0 or e.shape[0] == 0:
                continue
            total = 0.0
            for j in range(e.shape[0]):
                # softmax over words for every region, then over regions (times tau1) for word j
                a = r @ e.t()  # (M_k, T_i)
                p = torch.softmax(a, dim=1)[:, j]  # (M_k,)
                alpha = torch.softmax(tau1 * p, dim=0)
                c = (alpha[:, None] * r).sum(0)
                cos = (c @ e[j]) / max(float(c.norm() * e[j].norm()), 1e-8)
                total = total + math.exp(tau2 * float(cos))
            out[k, i] = tau3 * math.log(total)
    return out


def random_case(b_img, b_txt, m, t, d, seed, masks=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(b_img, m, d, generator=g, dtype=dtype)
    words = torch.randn(b_txt, t, d, generator=g, dtype=dtype)
    if masks:
        word_len = torch.randint(1, t + 1, (b_txt,), generator=g)
        region_len = torch.randint(1, m + 1, (b_img,), generator=g)
        word_mask = torch.arange(t)[None] < word_len[:, None]
        region_mask = torch.arange(m)[None] < region_len[:, None]
        # shuffle so that real positions are not always a prefix (a lateral view may be absent)
        word_mask = word_mask[:, torch.randperm(t, generator=g)]
        region_mask = region_mask[:, torch.randperm(m, generator=g)]
    else:
        word_mask = torch.ones(b_txt, t, dtype=torch.bool)
        region_mask = torch.ones(b_img, m, dtype=torch.bool)
    return regions, words, word_mask, region_mask


def test_matches_gloria_golden_values():
    data = json.loads(GOLDEN.read_text())
    for case in data["cases"]:
        regions = torch.tensor(case["regions"], dtype=torch.float64)
        words = torch.tensor(case["words"], dtype=torch.float64)
        word_mask = torch.tensor(case["word_mask"])
        region_mask = torch.tensor(case["region_mask"])
        s = local_alignment_scores(regions, words, word_mask, region_mask, case["tau1"], case["tau2"], case["tau3"])
        torch.testing.assert_close(s, torch.tensor(case["S"], dtype=torch.float64), atol=1e-10, rtol=1e-10)
        if "gloria_loss_rows" in case:
            labels = torch.arange(s.shape[0])
            assert F.cross_entropy(s, labels).item() == pytest.approx(case["gloria_loss_rows"], abs=1e-10)
            assert F.cross_entropy(s.t(), labels).item() == pytest.approx(case["gloria_loss_cols"], abs=1e-10)
            loss = local_alignment_loss(regions, words, word_mask, region_mask)
            expected = 0.5 * (case["gloria_loss_rows"] + case["gloria_loss_cols"])
            assert loss.item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize(
    "b_img,b_txt,m,t,d",
    [(3, 3, 6, 5, 8), (2, 5, 7, 9, 4), (1, 4, 13, 3, 16), (4, 1, 5, 11, 8), (3, 2, 1, 1, 3)],
)
def test_matches_loop_transcription(b_img, b_txt, m, t, d):
    args = random_case(b_img, b_txt, m, t, d, seed=b_img * 100 + m)
    expected = loop_local_scores(*args, 4.0, 5.0, 10.0)
    torch.testing.assert_close(local_alignment_scores(*args), expected, atol=1e-10, rtol=1e-10)


def test_other_temperatures_and_tensor_temperatures():
    args = random_case(3, 4, 9, 7, 5, seed=7)
    expected = loop_local_scores(*args, 2.5, 3.0, 7.0)
    taus = [torch.tensor(x, dtype=torch.float64) for x in (2.5, 3.0, 7.0)]
    torch.testing.assert_close(local_alignment_scores(*args, *taus), expected, atol=1e-10, rtol=1e-10)


def test_chunking_does_not_change_values_or_gradients():
    regions, words, wm, rm = random_case(7, 5, 11, 6, 4, seed=3)
    full_r = regions.clone().requires_grad_(True)
    full_w = words.clone().requires_grad_(True)
    chunk_r = regions.clone().requires_grad_(True)
    chunk_w = words.clone().requires_grad_(True)
    weights = torch.randn(7, 5, dtype=torch.float64)
    s_full = local_alignment_scores_ref(full_r, full_w, wm, rm, chunk_elements=1 << 30)
    s_chunk = local_alignment_scores_ref(chunk_r, chunk_w, wm, rm, chunk_elements=5 * 66)  # one image per chunk
    torch.testing.assert_close(s_full, s_chunk, atol=1e-12, rtol=1e-12)
    (s_full * weights).sum().backward()
    (s_chunk * weights).sum().backward()
    torch.testing.assert_close(full_r.grad, chunk_r.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(full_w.grad, chunk_w.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("form", ["ref", "gram"])
def test_gradcheck_all_inputs_and_temperatures(form):
    from clinvla_engine.kernels.local_align import local_align_gram

    scores = {"ref": local_alignment_scores_ref, "gram": local_align_gram}[form]
    regions, words, wm, rm = random_case(2, 3, 4, 3, 3, seed=11)
    taus = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (4.0, 5.0, 10.0)]
    regions.requires_grad_(True)
    words.requires_grad_(True)

    def fn(r, w, t1, t2, t3):
        return scores(r, w, wm, rm, t1, t2, t3, chunk_elements=40)

    assert torch.autograd.gradcheck(fn, (regions, words, *taus), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("b_img,b_txt,m,t,d,chunk", [(4, 4, 9, 7, 5, 1 << 30), (3, 5, 6, 11, 16, 5 * 66),
                                                    (5, 1, 13, 4, 8, 1 << 30), (2, 3, 1, 1, 3, 3)])
def test_gram_form_equals_gloria_reference_values_and_gradients(b_img, b_txt, m, t, d, chunk):
    # the CPU path (u = sum alpha a, |c|^2 = alpha^T R R^T alpha) against the reference as GLoRIA
    # writes it: every score and the gradient of every input and temperature, chunked or not
    from clinvla_engine.kernels.local_align import local_align_gram

    regions, words, wm, rm = random_case(b_img, b_txt, m, t, d, seed=b_img * 31 + t)
    wm[0, 1:] = False  # a one-word text
    weights = torch.randn(b_img, b_txt, dtype=torch.float64)
    results = []
    for fn in (local_alignment_scores_ref, local_align_gram):
        r, w = regions.clone().requires_grad_(True), words.clone().requires_grad_(True)
        taus = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (4.0, 5.0, 1.0)]
        s = fn(r, w, wm, rm, *taus, chunk_elements=chunk)
        (s * weights).sum().backward()
        results.append([s.detach(), r.grad, w.grad] + [tau.grad for tau in taus])
    for name, ref, gram in zip(("S", "dR", "dE", "dtau1", "dtau2", "dtau3"), *results):
        torch.testing.assert_close(gram, ref, atol=1e-12, rtol=1e-10, msg=name)
    picked = local_align_gram if m < d else local_alignment_scores_ref  # the cheaper form off the kernel
    assert local_alignment_scores(regions, words, wm, rm).equal(picked(regions, words, wm, rm))
    r16, w16 = regions.bfloat16(), words.bfloat16()  # half precision keeps the reference
    assert local_alignment_scores(r16, w16, wm, rm).equal(local_alignment_scores_ref(r16, w16, wm, rm))


def test_gram_form_with_all_zero_regions_stays_finite():
    # every context is 0 and the cosine's bound holds: the value is the reference's, the gradient finite
    from clinvla_engine.kernels.local_align import local_align_gram

    _, words, wm, rm = random_case(2, 3, 4, 3, 3, seed=11)
    zero = torch.zeros(2, 4, 3, dtype=torch.float64, requires_grad=True)
    s = local_align_gram(zero, words, wm, rm)
    torch.testing.assert_close(s.detach(), local_alignment_scores_ref(zero.detach(), words, wm, rm), atol=1e-12, rtol=0)
    s.sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_empty_rows_are_zero_and_never_nan():
    regions, words, wm, rm = random_case(3, 3, 5, 4, 6, seed=5)
    wm[1] = False  # a text with no real word
    rm[2] = False  # an image with no real region
    regions.requires_grad_(True)
    words.requires_grad_(True)
    s = local_alignment_scores(regions, words, wm, rm)
    assert torch.isfinite(s).all()
    assert (s[:, 1] == 0).all() and (s[2, :] == 0).all()
    expected = loop_local_scores(regions.detach(), words.detach(), wm, rm, 4.0, 5.0, 10.0)
    torch.testing.assert_close(s.detach(), expected, atol=1e-10, rtol=1e-10)
    s.sum().backward()
    assert torch.isfinite(regions.grad).all() and torch.isfinite(words.grad).all()
    assert (words.grad[1] == 0).all() and (regions.grad[2] == 0).all()


def test_empty_batches():
    regions = torch.randn(0, 4, 8)
    words = torch.randn(3, 5, 8)
    s = local_alignment_scores(regions, words, torch.ones(3, 5, dtype=torch.bool))
    assert s.shape == (0, 3)


def test_float32_close_to_float64():
    regions, words, wm, rm = random_case(4, 4, 49, 17, 32, seed=9)
    s64 = local_alignment_scores(regions, words, wm, rm)
    s32 = local_alignment_scores(regions.float(), words.float(), wm, rm)
    torch.testing.assert_close(s32.double(), s64, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(regions=torch.randn(2, 3, 4), words=torch.randn(2, 5, 6)), "share D"),
        (dict(regions=torch.randn(2, 3), words=torch.randn(2, 5, 4)), "regions must be"),
        (dict(word_mask=torch.ones(2, 4, dtype=torch.bool)), r"word_mask must be \(2, 5\) bool"),
        (dict(word_mask=torch.ones(2, 5)), "word_mask must be"),
        (dict(region_mask=torch.ones(2, 4, dtype=torch.bool)), r"region_mask must be \(2, 3\)"),
        (dict(regions=torch.randn(2, 3, 4).int()), "float32, float64"),
        (dict(words=torch.randn(2, 5, 4).double()), "dtype of regions"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(regions=torch.randn(2, 3, 4), words=torch.randn(2, 5, 4), word_mask=torch.ones(2, 5, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        local_alignment_scores(**args)


def test_local_loss_needs_square_scores():
    with pytest.raises(ValueError, match="square"):
        local_alignment_loss(torch.randn(2, 3, 4), torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool))


def test_global_loss_is_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(6, 16, generator=g, dtype=torch.float64), dim=-1)
    scale = 14.3
    loss = global_alignment_loss(img, txt, scale)
    # direct transcription: -log softmax of the diagonal, both directions, averaged
    total = 0.0
    for i in range(6):
        row = [scale * float(img[i] @ txt[j]) for j in range(6)]
        col = [scale * float(img[j] @ txt[i]) for j in range(6)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    assert loss.item() == pytest.approx(total / 12, abs=1e-12)
    with pytest.raises(ValueError, match="both be"):
        global_alignment_loss(img, txt[:5], scale)


def test_kernel_module_does_not_import_the_losses():
    """Arrows point one way: clinvla_engine.losses imports kernels.local_align (the reference and the
    input checks live there), never the reverse, so neither import can half-initialise the other."""
    import subprocess
    import sys

    code = ("import sys, clinvla_engine.kernels.local_align as la; "
            "print(sorted(m for m in sys.modules if m.startswith('clinvla_engine.losses')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing the kernel module imported {out.strip()}"
    from clinvla_engine.kernels.local_align import local_align_ref

    assert local_alignment_scores_ref is local_align_ref  # one implementation, two names kept for callers


def test_global_loss_logits_stay_float32_under_bf16_autocast():
    from clinvla_engine.losses import global_alignment_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.3 * torch.randn(16, 32, generator=g), dim=-1)
    exact = global_alignment_loss(img.double(), txt.double(), 100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = global_alignment_loss(img, txt, torch.tensor(100.0))
    assert got.dtype == torch.float32
    # bf16 logits at scale 100 are off by up to ~0.5 each; float32 ones agree to ~1e-5
    assert abs(got.item() - exact.item()) < 1e-4
