"""Fused Triton kernels for GLoRIA's local (word-to-region) alignment, forward and backward.

Maths (per image k with regions r_m, text i with words e_j; GLoRIA's local similarity)::

    a[m, j]     = r_m . e_j
    p[m, j]     = exp(a[m, j] - L[m]),        L[m] = log sum_j exp a[m, j]       (real words j)
    alpha[j, m] = exp(tau1 p[m, j] - N[j]),   N[j] = log sum_m exp tau1 p[m, j]  (real regions m)
    c_j = sum_m alpha[j, m] r_m,   u_j = c_j . e_j = sum_m alpha[j, m] a[m, j],   n2_j = |c_j|^2
    cos_j = u_j / max(sqrt(n2_j) |e_j|, 1e-8),   S[k, i] = tau3 * logsumexp_j (tau2 * cos_j)

The kernels compute, per (image, text) pair, the per-word statistics u (B_img, B_txt, T) and n2
(B_img, B_txt, T); the cheap remainder (cosine, tau2, log-sum-exp over real words, tau3, empty
rows) is plain PyTorch on those (B_img, B_txt, T) tensors, so autograd handles tau2 and tau3.

What is written to device memory: L (B_img, B_txt, M), N, u, n2 (B_img, B_txt, T), all float32.
What never is: the (B_img, B_txt, M, T) attention and the (B_img, B_txt, T, D) contexts.

Kernels (one program per image-text pair and block of words):

* ``_row_lse``   L[m] over all real words (the word softmax needs the whole row of a);
* ``_fwd``       one pass over region tiles with an online softmax over regions (flash-style):
                 accumulates c_j, u_j and the normaliser N_j for its block of words;
* ``_bwd_main``  recomputes c_j, forms dc_j = du_j e_j + 2 dn2_j c_j, then a second pass over region
                 tiles back-propagates through the region softmax and the word softmax (except the
                 row term), accumulating dR (atomics over texts), dE (atomics over images), the row
                 sums F[m] = sum_j p dp (atomics over word blocks) and dtau1;
* ``_bwd_row``   the word-softmax row term: da -= p * F[m].

Inputs are float32 or bfloat16; every dot runs on tensor cores with float32 accumulation. float32
dots use ``tf32x3`` (each operand split into a TF32 high and low part, three TF32 products): IEEE
FMA dots had no tensor-core instructions and spilled 7-176 KB per thread on sm_90, while tf32x3
keeps float32 accuracy (error ~2^-21 relative per product, inside the tests' float32 bound). D up to
1024 in bfloat16 and 256 in float32 (see MAX_D_FP32; padded to a power of two; ``_row_lse`` loops
over D in chunks), T up to 256, M any size. Tiles and pipeline stages are chosen per shape by
``launch_config`` so that every kernel fits the shared memory of an H200
(tools/gpu_compile_check.py proves it without a GPU).

The atomics that accumulate dR, dE and F are relaxed: they are pure sums, read only after the
kernel ends, so the default acquire-release ordering would buy nothing and cost a fence each.

Empty rows: a text with no real word or an image with no real region gives S = 0 for its pairs,
with zero gradient, never NaN (the same convention as the reference).

``local_align_ref`` (below) is the plain-PyTorch reference, written as GLoRIA writes it: test
oracle and benchmark baseline. ``local_align_gram`` is the same function in plain PyTorch by the
kernels' statistics (u_j = sum_m alpha a, n2_j = alpha^T (R R^T) alpha): no (B_img, B_txt, T, D)
context is formed. Off the kernel, clinvla_engine.losses takes it for float32 and float64 inputs
when M < D (the contexts cost M x D per word and pair, the Gram form M x M), as at the demo's
training shape (benchmarks/bench_local_align.py). Both and the input checks live here, beside the
kernel, so that clinvla_engine.losses imports this module and never the other way round.
"""
from __future__ import annotations

import os

import torch
from torch.utils.checkpoint import checkpoint

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; clinvla_engine.backends says why
    triton = None
    tl = None

MAX_T = 256
MAX_D = 1024  # bfloat16
# float32 stops at 256: its tf32x3 dots stage a high and a low part of every D-wide operand, and at a
# 1024-wide tile (D = 768) the backward needs 655,360 B of shared memory (the H200 has 232,448) and
# spills 44 KB per thread. Larger D in float32 takes the reference (local_alignment_scores does
# so by itself) until the kernels split D across programs.
MAX_D_FP32 = 256
COS_EPS = 1e-8  # GLoRIA uses torch's cosine_similarity eps: |c||e| clamped to at least 1e-8
DEFAULT_CHUNK_ELEMENTS = 1 << 24  # reference: attention entries per chunk of images (64 MiB in float32)

# The H200 (sm_90) allows 232,448 bytes of shared memory per block (opt-in). launch_config plans
# for 160 KiB, leaving room for what its model does not count (layout-conversion scratch, dot
# operands staged twice); tools/gpu_compile_check.py measures the real figure against the limit.
SMEM_PLAN = 160 * 1024


# ----------------------------------------------------------------------------------------------
# Input checks and the PyTorch reference
# ----------------------------------------------------------------------------------------------

def check_local_inputs(regions, words, word_mask, region_mask) -> torch.Tensor:
    """Validates shapes, dtypes and devices; returns the region mask (all True when None)."""
    if not isinstance(regions, torch.Tensor) or regions.dim() != 3:
        raise ValueError(f"regions must be (B_img, M, D) float, got {_desc(regions)}")
    if not isinstance(words, torch.Tensor) or words.dim() != 3:
        raise ValueError(f"words must be (B_txt, T, D) float, got {_desc(words)}")
    if regions.shape[2] != words.shape[2]:
        raise ValueError(
            f"regions and words must share D: regions is {tuple(regions.shape)}, words is {tuple(words.shape)}"
        )
    if regions.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"regions must be float32, float64, bfloat16 or float16, got {regions.dtype}")
    if words.dtype != regions.dtype:
        raise ValueError(f"words must have the dtype of regions ({regions.dtype}), got {words.dtype}")
    if words.device != regions.device:
        raise ValueError(f"words are on {words.device} but regions are on {regions.device}")
    b_img, m, _ = regions.shape
    b_txt, t, _ = words.shape
    if not isinstance(word_mask, torch.Tensor) or word_mask.shape != (b_txt, t) or word_mask.dtype != torch.bool:
        raise ValueError(f"word_mask must be ({b_txt}, {t}) bool (True = real word), got {_desc(word_mask)}")
    if region_mask is None:
        return torch.ones(b_img, m, dtype=torch.bool, device=regions.device)
    if not isinstance(region_mask, torch.Tensor) or region_mask.shape != (b_img, m) or region_mask.dtype != torch.bool:
        raise ValueError(f"region_mask must be ({b_img}, {m}) bool (True = real region) or None, got {_desc(region_mask)}")
    if word_mask.device != regions.device or region_mask.device != regions.device:
        raise ValueError(f"masks must be on {regions.device} like regions")
    return region_mask


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)} {x.dtype} on {x.device}"
    return type(x).__name__


def _as_tensor(tau, like: torch.Tensor) -> torch.Tensor:
    if isinstance(tau, torch.Tensor):
        return tau.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(tau), device=like.device, dtype=like.dtype)


def _chunk_scores(
    regions: torch.Tensor,  # (b, M, D) one chunk of images
    words: torch.Tensor,  # (B_txt, T, D)
    word_ok: torch.Tensor,  # (B_txt, T) bool, no all-False rows
    region_ok: torch.Tensor,  # (b, M) bool, no all-False rows
    tau1: torch.Tensor,
    tau2: torch.Tensor,
    tau3: torch.Tensor,
) -> torch.Tensor:
    neg = torch.finfo(regions.dtype).min
    a = torch.einsum("kmd,itd->kimt", regions, words)  # (b, B_txt, M, T)
    a = a.masked_fill(~word_ok[None, :, None, :], neg)
    p = torch.softmax(a, dim=-1) * tau1  # over words
    p = p.masked_fill(~region_ok[:, None, :, None], neg)
    alpha = torch.softmax(p, dim=2)  # over regions
    context = torch.einsum("kimt,kmd->kitd", alpha, regions)  # (b, B_txt, T, D)
    dot = (context * words[None]).sum(-1)
    norms = context.norm(dim=-1) * words.norm(dim=-1)[None]
    cos = dot / norms.clamp_min(COS_EPS)  # (b, B_txt, T)
    z = (tau2 * cos).masked_fill(~word_ok[None], neg)
    return tau3 * torch.logsumexp(z, dim=-1)  # (b, B_txt)


def _chunk_scores_gram(
    regions: torch.Tensor,  # (b, M, D) one chunk of images
    words: torch.Tensor,  # (B_txt, T, D)
    word_ok: torch.Tensor,  # (B_txt, T) bool, no all-False rows
    region_ok: torch.Tensor,  # (b, M) bool, no all-False rows
    tau1: torch.Tensor,
    tau2: torch.Tensor,
    tau3: torch.Tensor,
) -> torch.Tensor:
    """_chunk_scores by the kernels' statistics: u = c . e = sum_m alpha a and |c|^2 = alpha^T G
    alpha with G = R R^T (M x M per image), in place of the contexts c (b, B_txt, T, D)."""
    neg = torch.finfo(regions.dtype).min
    a = torch.einsum("kmd,itd->kimt", regions, words)  # (b, B_txt, M, T)
    p = torch.softmax(a.masked_fill(~word_ok[None, :, None, :], neg), dim=-1) * tau1  # over words
    p = p.masked_fill(~region_ok[:, None, :, None], neg)
    alpha = torch.softmax(p, dim=2)  # over regions; exactly 0 on padded regions
    u = (alpha * a).sum(2)  # (b, B_txt, T)
    gram = regions @ regions.transpose(1, 2)  # (b, M, M)
    n2 = (alpha * torch.einsum("kmn,kint->kimt", gram, alpha)).sum(2).clamp_min(0.0)
    e2 = (words * words).sum(-1)  # (B_txt, T)
    # max(|c| |e|, eps) as sqrt(max(|c|^2 |e|^2, eps^2)): the same value, and a finite gradient
    # (zero) where the bound holds
    cos = u / (n2 * e2[None]).clamp_min(COS_EPS * COS_EPS).sqrt()
    z = (tau2 * cos).masked_fill(~word_ok[None], neg)
    return tau3 * torch.logsumexp(z, dim=-1)  # (b, B_txt)


def local_align_ref(
    regions: torch.Tensor,  # (B_img, M, D) float
    words: torch.Tensor,  # (B_txt, T, D) float
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """S (B_img, B_txt) in the input dtype, exactly as GLoRIA's public ``local_loss`` computes it
    (the maths above, with softmaxes and einsums); differentiable in every tensor input and
    temperature; runs on any device and dtype.

    Memory is bounded by processing the images in chunks of ``chunk_elements`` attention entries;
    with gradients each chunk is recomputed in the backward pass (activation checkpointing), so the
    quadratic intermediates of only one chunk are alive at a time.
    """
    return _scores(_chunk_scores, regions, words, word_mask, region_mask, tau1, tau2, tau3, chunk_elements)


def local_align_gram(
    regions: torch.Tensor,  # (B_img, M, D) float
    words: torch.Tensor,  # (B_txt, T, D) float
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The same S as local_align_ref (same inputs, checks, empty-row rule, chunking), computed from
    the per-word statistics u and n2 as the kernels do: the (B_img, B_txt, T, D) contexts and
    their einsum are never formed. Equal to the reference to float64 rounding (tested); the
    dispatcher's path off the kernel for float32 / float64 when M < D."""
    return _scores(_chunk_scores_gram, regions, words, word_mask, region_mask, tau1, tau2, tau3, chunk_elements,
                   gram=True)


def _scores(chunk_fn, regions, words, word_mask, region_mask, tau1, tau2, tau3, chunk_elements: int,
            gram: bool = False) -> torch.Tensor:
    region_mask = check_local_inputs(regions, words, word_mask, region_mask)
    b_img, m, d = regions.shape
    b_txt, t, _ = words.shape
    if b_img == 0 or b_txt == 0:
        return regions.new_zeros(b_img, b_txt) + 0.0 * (regions.sum() + words.sum())
    t1, t2, t3 = (_as_tensor(x, regions) for x in (tau1, tau2, tau3))
    has_word = word_mask.any(dim=1)  # (B_txt,)
    has_region = region_mask.any(dim=1)  # (B_img,)
    # Rows with nothing real get an all-True mask for the arithmetic (so no NaN can form, in the
    # forward or the backward pass) and are zeroed at the end.
    word_ok = word_mask | ~has_word[:, None]
    region_ok = region_mask | ~has_region[:, None]
    per_image = b_txt * (max(m * t, 1) if gram else max(m * t, t * d, 1))
    step = max(1, min(b_img, chunk_elements // per_image))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (regions, words, t1, t2, t3))
    out = []
    for k0 in range(0, b_img, step):
        args = (regions[k0:k0 + step], words, word_ok, region_ok[k0:k0 + step], t1, t2, t3)
        if grad and step < b_img:
            out.append(checkpoint(chunk_fn, *args, use_reentrant=False))
        else:
            out.append(chunk_fn(*args))
    scores = torch.cat(out, dim=0)
    valid = has_region[:, None] & has_word[None, :]
    return scores.masked_fill(~valid, 0.0)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# Integer arguments named in do_not_specialize are sizes or strides of small per-row vectors
# (flags, L, N, F, statistics). Triton would otherwise compile a second kernel set when one of
# them is 1 (B_TXT = 1: re-ranking) or divisible by 16 (M = 2048 against 392), for nothing: they
# never address a feature tile, whose strides (and D) stay specialised because their divisibility
# is what makes the tile loads and atomics vectorised.

if triton is not None:

    @triton.jit
    def _mm(a, b, FP32: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the Triton CPU interpreter mis-multiplies bfloat16 dots, so it gets float32.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif FP32:
            return tl.dot(a, b, input_precision="tf32x3")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _tile(BASE, offs_row, row_in, s_row, d0, D, BLOCK_D: tl.constexpr):
        """Rows offs_row (int64 offsets: an index can pass 2^31) x features d0 .. d0 + BLOCK_D."""
        offs_d = d0 + tl.arange(0, BLOCK_D)
        return tl.load(BASE + offs_row[:, None].to(tl.int64) * s_row + offs_d[None, :],
                       mask=row_in[:, None] & (offs_d < D)[None, :], other=0.0)

    @triton.jit
    def _word_flags(WOK, i, t0, T, s_wb, BLOCK_T: tl.constexpr):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_in = offs_t < T
        w_ok = (tl.load(WOK + i * s_wb + offs_t, mask=t_in, other=0) != 0) & t_in
        return offs_t, t_in, w_ok

    @triton.jit
    def _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, FP32: tl.constexpr, UPCAST: tl.constexpr):
        """a = r e^T and p = softmax over the real words (from the stored row normaliser L)."""
        lse = tl.load(L + k * s_lk + i * s_li + offs_m, mask=m_in, other=0.0)
        a = _mm(r, tl.trans(e), FP32, UPCAST)  # (BLOCK_M, BLOCK_T)
        p = tl.exp(tl.where(w_ok[None, :], a - lse[:, None], float("-inf")))
        return a, p

    @triton.jit
    def _region_ok(ROK, k, s_ob, offs_m, m_in):
        return (tl.load(ROK + k * s_ob + offs_m, mask=m_in, other=0) != 0) & m_in

    @triton.jit(do_not_specialize=["B_TXT", "M", "T", "s_wb", "s_lk", "s_li"])
    def _row_lse(
        R, E, WOK, L,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_lk, s_li,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # BLOCK_T covers every word; D is walked in chunks of BLOCK_D, because a whole row of words
        # at full D (256 x 1024 float32) cannot sit in shared memory.
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_in = offs_m < M
        offs_t, t_in, w_ok = _word_flags(WOK, i, 0, T, s_wb, BLOCK_T)
        a = tl.zeros([BLOCK_M, BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            r = _tile(R + k * s_rb, offs_m, m_in, s_rm, d0, D, BLOCK_D)
            e = _tile(E + i * s_eb, offs_t, t_in, s_et, d0, D, BLOCK_D)
            a += _mm(r, tl.trans(e), FP32, UPCAST)
        a = tl.where(w_ok[None, :], a, float("-inf"))
        mx = tl.max(a, axis=1)
        lse = mx + tl.log(tl.sum(tl.exp(a - mx[:, None]), axis=1))
        tl.store(L + k * s_lk + i * s_li + offs_m, lse, mask=m_in)

    @triton.jit(do_not_specialize=["B_TXT", "M", "T", "s_wb", "s_ob", "s_lk", "s_li", "s_ok", "s_oi"])
    def _fwd(
        R, E, WOK, ROK, L, TAU1, N_OUT, U_OUT, C2_OUT,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_ob, s_lk, s_li, s_ok, s_oi,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, w_ok = _word_flags(WOK, i, tl.program_id(1) * BLOCK_T, T, s_wb, BLOCK_T)
        e = _tile(E + i * s_eb, offs_t, t_in, s_et, 0, D, BLOCK_D)
        tau1 = tl.load(TAU1)
        m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_T], tl.float32)
        u_acc = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < M
            r = _tile(R + k * s_rb, offs_m, m_in, s_rm, 0, D, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, FP32, UPCAST)
            # online softmax over regions (flash-style): running max, rescaled sums
            q = tl.where(r_ok[:, None], tau1 * p, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(q, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m_run - m_safe)
            w = tl.exp(q - m_safe[None, :])  # unnormalised alpha^T, (BLOCK_M, BLOCK_T)
            l_run = l_run * scale + tl.sum(w, axis=0)
            u_acc = u_acc * scale + tl.sum(w * a, axis=0)
            acc = acc * scale[:, None] + _mm(tl.trans(w).to(r.dtype), r, FP32, UPCAST)
            m_run = m_new
        l_safe = tl.where(l_run > 0, l_run, 1.0)
        c = acc / l_safe[:, None]
        out = k * s_ok + i * s_oi + offs_t
        tl.store(N_OUT + out, m_run + tl.log(l_safe), mask=t_in)
        tl.store(U_OUT + out, u_acc / l_safe, mask=t_in)
        tl.store(C2_OUT + out, tl.sum(c * c, axis=1), mask=t_in)

    @triton.jit(do_not_specialize=["B_TXT", "M", "T", "N_TBLK", "s_wb", "s_ob", "s_lk", "s_li", "s_ok", "s_oi"])
    def _bwd_main(
        R, E, WOK, ROK, L, N, GAM, DLT, DJ, TAU1, DR, DE, F, DTAU,
        B_TXT, M, T, D, N_TBLK,
        s_rb, s_rm, s_eb, s_et, s_wb, s_ob, s_lk, s_li, s_ok, s_oi, s_drb, s_drm, s_deb, s_det,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        tblk = tl.program_id(1)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, w_ok = _word_flags(WOK, i, tblk * BLOCK_T, T, s_wb, BLOCK_T)
        e = _tile(E + i * s_eb, offs_t, t_in, s_et, 0, D, BLOCK_D)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        tau1 = tl.load(TAU1)
        stat = k * s_ok + i * s_oi + offs_t
        n_j = tl.load(N + stat, mask=t_in, other=0.0)
        gam = tl.load(GAM + stat, mask=t_in, other=0.0)
        dlt = tl.load(DLT + stat, mask=t_in, other=0.0)
        d_j = tl.load(DJ + stat, mask=t_in, other=0.0)

        # pass A: the contexts c_j of this block of words (N is final, so no online softmax)
        ctx = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < M
            r = _tile(R + k * s_rb, offs_m, m_in, s_rm, 0, D, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, FP32, UPCAST)
            alpha = tl.where(r_ok[:, None], tl.exp(tau1 * p - n_j[None, :]), 0.0)
            ctx += _mm(tl.trans(alpha).to(r.dtype), r, FP32, UPCAST)
        # d(loss)/dc_j and the direct part of d(loss)/de_j
        dc = gam[:, None] * e.to(tl.float32) + dlt[:, None] * ctx
        de_acc = gam[:, None] * ctx

        # pass B: through the region softmax and the word softmax (its row term waits for F)
        tau_part = tl.zeros([BLOCK_T], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < M
            r = _tile(R + k * s_rb, offs_m, m_in, s_rm, 0, D, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, FP32, UPCAST)
            alpha = tl.where(r_ok[:, None], tl.exp(tau1 * p - n_j[None, :]), 0.0)
            # dalpha[m, j] = r_m . dc_j. In bfloat16, dc is split into a high and a low bfloat16 part:
            # the region softmax backward subtracts D_j = sum_m alpha dalpha (computed exactly from
            # the forward's u and n2), and a singly rounded dc would break that cancellation.
            # (float32 needs no split: tf32x3 already carries dc's low part.)
            if FP32:
                dalpha = _mm(r, tl.trans(dc), FP32, UPCAST)
            else:
                dc_hi = dc.to(r.dtype)
                dc_lo = (dc - dc_hi.to(tl.float32)).to(r.dtype)
                dalpha = _mm(r, tl.trans(dc_hi), FP32, UPCAST) + _mm(r, tl.trans(dc_lo), FP32, UPCAST)
            dq = alpha * (dalpha - d_j[None, :])
            tau_part += tl.sum(dq * p, axis=0)
            pdp = p * (tau1 * dq)
            tl.atomic_add(F + k * s_lk + i * s_li + offs_m, tl.sum(pdp, axis=1), mask=m_in, sem="relaxed")
            dr = _mm(alpha.to(r.dtype), dc.to(r.dtype), FP32, UPCAST) + _mm(pdp.to(r.dtype), e, FP32, UPCAST)
            tl.atomic_add(DR + k * s_drb + offs_m[:, None].to(tl.int64) * s_drm + offs_d[None, :], dr,
                          mask=m_in[:, None] & d_ok[None, :], sem="relaxed")
            de_acc += _mm(tl.trans(pdp).to(r.dtype), r, FP32, UPCAST)
        tl.atomic_add(DE + i * s_deb + offs_t[:, None].to(tl.int64) * s_det + offs_d[None, :], de_acc,
                      mask=t_in[:, None] & d_ok[None, :], sem="relaxed")
        tl.store(DTAU + pair * N_TBLK + tblk, tl.sum(tau_part, axis=0))

    @triton.jit(do_not_specialize=["B_TXT", "M", "T", "s_wb", "s_lk", "s_li"])
    def _bwd_row(
        R, E, WOK, L, F, DR, DE,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_lk, s_li, s_drb, s_drm, s_deb, s_det,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        FP32: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, w_ok = _word_flags(WOK, i, tl.program_id(1) * BLOCK_T, T, s_wb, BLOCK_T)
        e = _tile(E + i * s_eb, offs_t, t_in, s_et, 0, D, BLOCK_D)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        de_acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_in = offs_m < M
            r = _tile(R + k * s_rb, offs_m, m_in, s_rm, 0, D, BLOCK_D)
            _, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, FP32, UPCAST)
            g = p * tl.load(F + k * s_lk + i * s_li + offs_m, mask=m_in, other=0.0)[:, None]  # p * F
            dr = -_mm(g.to(r.dtype), e, FP32, UPCAST)
            tl.atomic_add(DR + k * s_drb + offs_m[:, None].to(tl.int64) * s_drm + offs_d[None, :], dr,
                          mask=m_in[:, None] & d_ok[None, :], sem="relaxed")
            de_acc -= _mm(tl.trans(g).to(r.dtype), r, FP32, UPCAST)
        tl.atomic_add(DE + i * s_deb + offs_t[:, None].to(tl.int64) * s_det + offs_d[None, :], de_acc,
                      mask=t_in[:, None] & d_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launch plan and launchers
# ----------------------------------------------------------------------------------------------

def _alloc(*shape: int, device) -> torch.Tensor:
    """Float32 buffer for a kernel to fill (the tests replace this with a NaN-poisoned one)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def _stages(tile_bytes: int, fixed_bytes: int, loops: int = 1) -> int:
    """The most software-pipeline stages (3 down to 1) whose buffers fit the plan: each stage of
    each loop holds one region tile; `fixed_bytes` are the loop-invariant operands."""
    for stages in (3, 2):
        if fixed_bytes + loops * stages * tile_bytes <= SMEM_PLAN:
            return stages
    return 1


def launch_config(m: int, t: int, d: int, dtype: torch.dtype = torch.float32) -> dict:
    """Tiles, warps and pipeline stages for one (M, T, D, dtype), sized for the H200 (sm_90).

    Registers: the context-like tiles (BLOCK_T x BLOCK_D float32: c, dc, dE) live in registers, up
    to four at once in the backward, so a word block holds at most 4K of them (BLOCK_T 32 at
    D = 128; 16K spilled 1-7 KB per thread). Region tiles hold at most 16 KB: up to 64 rows in
    bfloat16 (the wgmma height) and 32 in float32, whose tf32x3 dots hold a high and a low part of
    every operand (at D = 256, 32 float32 rows spilled 20 KB per thread, 16 rows under 1 KB).
    Shared memory holds, per pipeline stage, the region tile the loop prefetches, plus the
    loop-invariant operands (the word tile; in the backward also dc, as hi + lo in bfloat16):
    the stage count is the largest that keeps that within SMEM_PLAN, counting float32 operands
    twice (tf32x3's two parts). ``_row_lse`` needs all words of a row, so it walks D in chunks
    (row_block_d) small enough for two stages of (regions + words) chunks.
    tools/gpu_compile_check.py measures what Triton actually allocates.
    """
    size = 8 if dtype == torch.float32 else 2  # bytes per operand element as staged in shared memory
    block_d = _pow2(d)
    t_pad = _pow2(t)
    block_t = min(t_pad, max(16, 4096 // block_d))
    block_m = max(16, min(32, 4096 // block_d) if dtype == torch.float32 else min(64, 8192 // block_d))
    row_block_m = 64
    row_block_d = block_d
    while row_block_d > 16 and 2 * (row_block_m + t_pad) * row_block_d * size > SMEM_PLAN:
        row_block_d //= 2
    region_tile = block_m * block_d * size
    word_tile = block_t * block_d * size
    return dict(
        block_d=block_d, t_pad=t_pad, block_t=block_t, block_m=block_m,
        row_block_m=row_block_m, row_block_d=row_block_d, num_warps=8,
        row_stages=_stages((row_block_m + t_pad) * row_block_d * size, 0),
        fwd_stages=_stages(region_tile, word_tile),
        bwd_main_stages=_stages(region_tile, 3 * word_tile, loops=2),  # e, and dc (hi + lo in bf16)
        bwd_row_stages=_stages(region_tile, word_tile),
    )


def _launch_forward(regions, words, wok, rok, tau1_t):
    """Runs _row_lse and _fwd; returns (L, N, u, n2). Inputs contiguous, masks uint8."""
    b_img, m, d = regions.shape
    b_txt, t, _ = words.shape
    cfg = launch_config(m, t, d, regions.dtype)
    dev = regions.device
    lse = _alloc(b_img, b_txt, m, device=dev)
    n_out = _alloc(b_img, b_txt, t, device=dev)
    u_out = _alloc(b_img, b_txt, t, device=dev)
    c2_out = _alloc(b_img, b_txt, t, device=dev)
    flags = dict(FP32=regions.dtype == torch.float32, UPCAST=_interpret(), num_warps=cfg["num_warps"])
    pairs = b_img * b_txt
    _row_lse[(pairs, triton.cdiv(m, cfg["row_block_m"]))](
        regions, words, wok, lse, b_txt, m, t, d,
        regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0),
        lse.stride(0), lse.stride(1),
        BLOCK_M=cfg["row_block_m"], BLOCK_T=cfg["t_pad"], BLOCK_D=cfg["row_block_d"],
        num_stages=cfg["row_stages"], **flags,
    )
    _fwd[(pairs, triton.cdiv(t, cfg["block_t"]))](
        regions, words, wok, rok, lse, tau1_t, n_out, u_out, c2_out, b_txt, m, t, d,
        regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0), rok.stride(0),
        lse.stride(0), lse.stride(1), n_out.stride(0), n_out.stride(1),
        BLOCK_M=cfg["block_m"], BLOCK_T=cfg["block_t"], BLOCK_D=cfg["block_d"],
        num_stages=cfg["fwd_stages"], **flags,
    )
    return lse, n_out, u_out, c2_out


def _launch_backward(regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t, du, dc2):
    """Runs _bwd_main and _bwd_row; returns (dR, dE, per-program dtau1 parts), all float32."""
    b_img, m, d = regions.shape
    b_txt, t, _ = words.shape
    cfg = launch_config(m, t, d, regions.dtype)
    dev = regions.device
    gam = du
    dlt = (2.0 * dc2).contiguous()
    d_j = (gam * u_out + dlt * c2_out).contiguous()  # sum_m alpha dalpha = dc_j . c_j
    dr = torch.zeros(b_img, m, d, device=dev, dtype=torch.float32)
    de = torch.zeros(b_txt, t, d, device=dev, dtype=torch.float32)
    f = torch.zeros(b_img, b_txt, m, device=dev, dtype=torch.float32)
    n_tblk = triton.cdiv(t, cfg["block_t"])
    pairs = b_img * b_txt
    dtau = _alloc(pairs * n_tblk, device=dev)
    common = dict(BLOCK_M=cfg["block_m"], BLOCK_T=cfg["block_t"], BLOCK_D=cfg["block_d"],
                  FP32=regions.dtype == torch.float32, UPCAST=_interpret(), num_warps=cfg["num_warps"])
    _bwd_main[(pairs, n_tblk)](
        regions, words, wok, rok, lse, n_out, gam, dlt, d_j, tau1_t, dr, de, f, dtau,
        b_txt, m, t, d, n_tblk,
        regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0), rok.stride(0),
        lse.stride(0), lse.stride(1), n_out.stride(0), n_out.stride(1), dr.stride(0), dr.stride(1),
        de.stride(0), de.stride(1), num_stages=cfg["bwd_main_stages"], **common,
    )
    _bwd_row[(pairs, n_tblk)](
        regions, words, wok, lse, f, dr, de, b_txt, m, t, d,
        regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0),
        lse.stride(0), lse.stride(1), dr.stride(0), dr.stride(1), de.stride(0), de.stride(1),
        num_stages=cfg["bwd_row_stages"], **common,
    )
    return dr, de, dtau


class _LocalAlignStats(torch.autograd.Function):
    """(regions, words, word_ok, region_ok, tau1) -> (u, n2), both (B_img, B_txt, T) float32."""

    @staticmethod
    def forward(ctx, regions, words, word_ok, region_ok, tau1):
        dev = regions.device
        regions = regions.contiguous()
        words = words.contiguous()
        wok = word_ok.to(torch.uint8).contiguous()
        rok = region_ok.to(torch.uint8).contiguous()
        tau1_t = tau1.detach().to(device=dev, dtype=torch.float32).reshape(1).contiguous()
        lse, n_out, u_out, c2_out = _launch_forward(regions, words, wok, rok, tau1_t)
        ctx.save_for_backward(regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t)
        return u_out, c2_out

    @staticmethod
    def backward(ctx, du, dc2):
        regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t = ctx.saved_tensors
        du = torch.zeros_like(u_out) if du is None else du.float().contiguous()
        dc2 = torch.zeros_like(c2_out) if dc2 is None else dc2.float().contiguous()
        dr, de, dtau = _launch_backward(regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t, du, dc2)
        dtau1 = dtau.sum() if ctx.needs_input_grad[4] else None
        return dr.to(regions.dtype), de.to(words.dtype), None, None, dtau1


def unsupported(t: int, d: int, dtype: torch.dtype) -> str | None:
    """Why the kernel does not take T words of D features in `dtype`, or None when it does. The
    dispatcher (clinvla_engine.losses) takes the reference then; tools/gpu_compile_check.py skips."""
    if dtype not in (torch.float32, torch.bfloat16):
        return f"local_align takes float32 or bfloat16 regions and words, got {dtype}"
    if t > MAX_T:
        return f"local_align takes at most {MAX_T} words per text, got {t}"
    if d > MAX_D:
        return f"local_align takes D up to {MAX_D}, got D = {d}"
    if d > MAX_D_FP32 and dtype == torch.float32:
        return f"local_align takes float32 only up to D = {MAX_D_FP32}, got D = {d}: use bfloat16"
    return None


def _check_kernel_inputs(regions: torch.Tensor, words: torch.Tensor) -> None:
    if triton is None:
        from clinvla_engine.backends import BackendUnavailable

        raise BackendUnavailable("local_align needs Triton: pip install 'clinvla-engine[gpu]'")
    why = unsupported(words.shape[1], words.shape[2], regions.dtype)
    if why is not None:
        raise ValueError(f"{why} (words {tuple(words.shape)}); use the reference for this input "
                         "(fused=False, or fused=None, which picks it)")
    if not regions.is_cuda and not _interpret():
        raise ValueError(
            f"local_align (fused=True) needs CUDA tensors, got regions on {regions.device}; move them to a GPU "
            "or use fused=False (the PyTorch reference)"
        )


def local_align(
    regions: torch.Tensor,  # (B_img, M, D) float32 or bfloat16
    words: torch.Tensor,  # (B_txt, T, D) same dtype
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
) -> torch.Tensor:
    """S (B_img, B_txt) in the input dtype: the fused-kernel version of local_align_ref."""
    region_mask = check_local_inputs(regions, words, word_mask, region_mask)
    _check_kernel_inputs(regions, words)
    b_img, b_txt = regions.shape[0], words.shape[0]
    if b_img == 0 or b_txt == 0 or words.shape[1] == 0 or regions.shape[1] == 0:
        return regions.new_zeros(b_img, b_txt) + 0.0 * (regions.sum() + words.sum())
    dev = regions.device
    has_word = word_mask.any(dim=1)
    has_region = region_mask.any(dim=1)
    word_ok = word_mask | ~has_word[:, None]
    region_ok = region_mask | ~has_region[:, None]
    t1 = tau1 if isinstance(tau1, torch.Tensor) else torch.tensor(float(tau1), device=dev)
    u, c2 = _LocalAlignStats.apply(regions, words, word_ok, region_ok, t1.float())
    wnorm = words.float().norm(dim=-1)  # (B_txt, T)
    cos = u / (c2.clamp_min(1e-30).sqrt() * wnorm[None]).clamp_min(COS_EPS)
    t2 = tau2.float() if isinstance(tau2, torch.Tensor) else float(tau2)
    t3 = tau3.float() if isinstance(tau3, torch.Tensor) else float(tau3)
    z = (t2 * cos).masked_fill(~word_ok[None], float("-inf"))
    scores = t3 * torch.logsumexp(z, dim=-1)
    valid = has_region[:, None] & has_word[None, :]
    return scores.masked_fill(~valid, 0.0).to(regions.dtype)
