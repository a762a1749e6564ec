"""Fused Triton kernels for GLoRIA's local (word-to-region) alignment, forward and backward.

Maths (per image k with regions r_m, text i with words e_j; see clinvla_engine.losses.local_align)::

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

Inputs are float32 (dot products in IEEE float32) or bfloat16 (tensor-core dots, float32
accumulation). D any size up to 1024 (padded to a power of two), T up to 256, M any size.

Empty rows: a text with no real word or an image with no real region gives S = 0 for its pairs,
with zero gradient, never NaN (the same convention as the reference).
"""
from __future__ import annotations

import torch

from clinvla_engine.losses.local_align import (
    COS_EPS,
    check_local_inputs,
    local_alignment_scores_ref,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # the package imports without Triton; clinvla_engine.backends says why
    triton = None
    tl = None

MAX_T = 256
MAX_D = 1024

# The PyTorch reference: test oracle, CPU fallback and benchmark baseline.
local_align_ref = local_alignment_scores_ref


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the Triton CPU interpreter mis-multiplies bfloat16 dots, so it gets float32.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _words(E, WOK, i, t0, T, D, s_eb, s_et, s_wb, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """A block of text i's words: offsets, in-range flags, features (BLOCK_T, BLOCK_D), real-word flags."""
        offs_t = t0 + tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, BLOCK_D)
        t_in = offs_t < T
        e = tl.load(E + i * s_eb + offs_t[:, None].to(tl.int64) * s_et + offs_d[None, :],
                    mask=t_in[:, None] & (offs_d < D)[None, :], other=0.0)
        w_ok = (tl.load(WOK + i * s_wb + offs_t, mask=t_in, other=0) != 0) & t_in
        return offs_t, t_in, e, w_ok

    @triton.jit
    def _regions(R, k, m0, M, D, s_rb, s_rm, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """A tile of image k's regions: offsets, in-range flags, features (BLOCK_M, BLOCK_D)."""
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_in = offs_m < M
        r = tl.load(R + k * s_rb + offs_m[:, None].to(tl.int64) * s_rm + offs_d[None, :],
                    mask=m_in[:, None] & (offs_d < D)[None, :], other=0.0)
        return offs_m, m_in, r

    @triton.jit
    def _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """a = r e^T and p = softmax over the real words (from the stored row normaliser L)."""
        lse = tl.load(L + k * s_lk + i * s_li + offs_m, mask=m_in, other=0.0)
        a = _mm(r, tl.trans(e), IEEE, UPCAST)  # (BLOCK_M, BLOCK_T)
        p = tl.exp(tl.where(w_ok[None, :], a - lse[:, None], float("-inf")))
        return a, p

    @triton.jit
    def _region_ok(ROK, k, s_ob, offs_m, m_in):
        return (tl.load(ROK + k * s_ob + offs_m, mask=m_in, other=0) != 0) & m_in

    @triton.jit
    def _row_lse(
        R, E, WOK, L,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_lk, s_li,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_m, m_in, r = _regions(R, k, tl.program_id(1) * BLOCK_M, M, D, s_rb, s_rm, BLOCK_M, BLOCK_D)
        _, _, e, w_ok = _words(E, WOK, i, 0, T, D, s_eb, s_et, s_wb, BLOCK_T, BLOCK_D)  # every word
        a = tl.where(w_ok[None, :], _mm(r, tl.trans(e), IEEE, UPCAST), float("-inf"))
        mx = tl.max(a, axis=1)
        lse = mx + tl.log(tl.sum(tl.exp(a - mx[:, None]), axis=1))
        tl.store(L + k * s_lk + i * s_li + offs_m, lse, mask=m_in)

    @triton.jit
    def _fwd(
        R, E, WOK, ROK, L, TAU1, N_OUT, U_OUT, C2_OUT,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_ob, s_lk, s_li, s_ok, s_oi,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, e, w_ok = _words(E, WOK, i, tl.program_id(1) * BLOCK_T, T, D, s_eb, s_et, s_wb,
                                       BLOCK_T, BLOCK_D)
        tau1 = tl.load(TAU1)
        m_run = tl.full([BLOCK_T], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_T], tl.float32)
        u_acc = tl.zeros([BLOCK_T], tl.float32)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m, m_in, r = _regions(R, k, m0, M, D, s_rb, s_rm, BLOCK_M, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, IEEE, UPCAST)
            # online softmax over regions (flash-style): running max, rescaled sums
            q = tl.where(r_ok[:, None], tau1 * p, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(q, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            scale = tl.exp(m_run - m_safe)
            w = tl.exp(q - m_safe[None, :])  # unnormalised alpha^T, (BLOCK_M, BLOCK_T)
            l_run = l_run * scale + tl.sum(w, axis=0)
            u_acc = u_acc * scale + tl.sum(w * a, axis=0)
            acc = acc * scale[:, None] + _mm(tl.trans(w).to(r.dtype), r, IEEE, UPCAST)
            m_run = m_new
        l_safe = tl.where(l_run > 0, l_run, 1.0)
        c = acc / l_safe[:, None]
        out = k * s_ok + i * s_oi + offs_t
        tl.store(N_OUT + out, m_run + tl.log(l_safe), mask=t_in)
        tl.store(U_OUT + out, u_acc / l_safe, mask=t_in)
        tl.store(C2_OUT + out, tl.sum(c * c, axis=1), mask=t_in)

    @triton.jit
    def _bwd_main(
        R, E, WOK, ROK, L, N, GAM, DLT, DJ, TAU1, DR, DE, F, DTAU,
        B_TXT, M, T, D, N_TBLK,
        s_rb, s_rm, s_eb, s_et, s_wb, s_ob, s_lk, s_li, s_ok, s_oi, s_drb, s_drm, s_deb, s_det,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        tblk = tl.program_id(1)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, e, w_ok = _words(E, WOK, i, tblk * BLOCK_T, T, D, s_eb, s_et, s_wb, BLOCK_T, BLOCK_D)
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
            offs_m, m_in, r = _regions(R, k, m0, M, D, s_rb, s_rm, BLOCK_M, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, IEEE, UPCAST)
            alpha = tl.where(r_ok[:, None], tl.exp(tau1 * p - n_j[None, :]), 0.0)
            ctx += _mm(tl.trans(alpha).to(r.dtype), r, IEEE, UPCAST)
        # d(loss)/dc_j and the direct part of d(loss)/de_j
        dc = gam[:, None] * e.to(tl.float32) + dlt[:, None] * ctx
        de_acc = gam[:, None] * ctx

        # pass B: through the region softmax and the word softmax (its row term waits for F)
        tau_part = tl.zeros([BLOCK_T], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m, m_in, r = _regions(R, k, m0, M, D, s_rb, s_rm, BLOCK_M, BLOCK_D)
            r_ok = _region_ok(ROK, k, s_ob, offs_m, m_in)
            a, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, IEEE, UPCAST)
            alpha = tl.where(r_ok[:, None], tl.exp(tau1 * p - n_j[None, :]), 0.0)
            # dalpha[m, j] = r_m . dc_j. In bfloat16, dc is split into a high and a low bfloat16 part:
            # the region softmax backward subtracts D_j = sum_m alpha dalpha (computed exactly from
            # the forward's u and n2), and a singly rounded dc would break that cancellation.
            if IEEE:
                dalpha = _mm(r, tl.trans(dc), IEEE, UPCAST)
            else:
                dc_hi = dc.to(r.dtype)
                dc_lo = (dc - dc_hi.to(tl.float32)).to(r.dtype)
                dalpha = _mm(r, tl.trans(dc_hi), IEEE, UPCAST) + _mm(r, tl.trans(dc_lo), IEEE, UPCAST)
            dq = alpha * (dalpha - d_j[None, :])
            tau_part += tl.sum(dq * p, axis=0)
            pdp = p * (tau1 * dq)
            tl.atomic_add(F + k * s_lk + i * s_li + offs_m, tl.sum(pdp, axis=1), mask=m_in)
            dr = _mm(alpha.to(r.dtype), dc.to(r.dtype), IEEE, UPCAST) + _mm(pdp.to(r.dtype), e, IEEE, UPCAST)
            tl.atomic_add(DR + k * s_drb + offs_m[:, None].to(tl.int64) * s_drm + offs_d[None, :], dr,
                          mask=m_in[:, None] & d_ok[None, :])
            de_acc += _mm(tl.trans(pdp).to(r.dtype), r, IEEE, UPCAST)
        tl.atomic_add(DE + i * s_deb + offs_t[:, None].to(tl.int64) * s_det + offs_d[None, :], de_acc,
                      mask=t_in[:, None] & d_ok[None, :])
        tl.store(DTAU + pair * N_TBLK + tblk, tl.sum(tau_part, axis=0))

    @triton.jit
    def _bwd_row(
        R, E, WOK, L, F, DR, DE,
        B_TXT, M, T, D,
        s_rb, s_rm, s_eb, s_et, s_wb, s_lk, s_li, s_drb, s_drm, s_deb, s_det,
        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        pair = tl.program_id(0).to(tl.int64)
        k = pair // B_TXT
        i = pair % B_TXT
        offs_t, t_in, e, w_ok = _words(E, WOK, i, tl.program_id(1) * BLOCK_T, T, D, s_eb, s_et, s_wb,
                                       BLOCK_T, BLOCK_D)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        de_acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m, m_in, r = _regions(R, k, m0, M, D, s_rb, s_rm, BLOCK_M, BLOCK_D)
            _, p = _word_softmax(r, e, w_ok, L, k, i, offs_m, m_in, s_lk, s_li, IEEE, UPCAST)
            g = p * tl.load(F + k * s_lk + i * s_li + offs_m, mask=m_in, other=0.0)[:, None]  # p * F
            dr = -_mm(g.to(r.dtype), e, IEEE, UPCAST)
            tl.atomic_add(DR + k * s_drb + offs_m[:, None].to(tl.int64) * s_drm + offs_d[None, :], dr,
                          mask=m_in[:, None] & d_ok[None, :])
            de_acc -= _mm(tl.trans(g).to(r.dtype), r, IEEE, UPCAST)
        tl.atomic_add(DE + i * s_deb + offs_t[:, None].to(tl.int64) * s_det + offs_d[None, :], de_acc,
                      mask=t_in[:, None] & d_ok[None, :])


def _alloc(*shape: int, device) -> torch.Tensor:
    """Float32 buffer for a kernel to fill (the tests replace this with a NaN-poisoned one)."""
    return torch.empty(*shape, device=device, dtype=torch.float32)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def launch_config(m: int, t: int, d: int) -> dict:
    """Block sizes: the whole (padded) D in one tile; word blocks sized to keep a tile of the
    contexts (BLOCK_T x BLOCK_D float32) within 16K elements; region tiles of 16-64."""
    block_d = _pow2(d)
    t_pad = _pow2(t)
    block_t = min(t_pad, max(16, 16384 // block_d))
    block_m = max(16, min(64, 8192 // block_d, _pow2(m)))
    row_block_m = max(16, min(64, 8192 // max(block_d, t_pad)))
    warps = 4 if block_d * block_t <= 4096 else 8
    return dict(block_d=block_d, t_pad=t_pad, block_t=block_t, block_m=block_m, row_block_m=row_block_m,
                num_warps=warps)


class _LocalAlignStats(torch.autograd.Function):
    """(regions, words, word_ok, region_ok, tau1) -> (u, n2), both (B_img, B_txt, T) float32."""

    @staticmethod
    def forward(ctx, regions, words, word_ok, region_ok, tau1):
        b_img, m, d = regions.shape
        b_txt, t, _ = words.shape
        cfg = launch_config(m, t, d)
        dev = regions.device
        regions = regions.contiguous()
        words = words.contiguous()
        wok = word_ok.to(torch.uint8).contiguous()
        rok = region_ok.to(torch.uint8).contiguous()
        tau1_t = tau1.detach().to(device=dev, dtype=torch.float32).reshape(1).contiguous()
        lse = _alloc(b_img, b_txt, m, device=dev)
        n_out = _alloc(b_img, b_txt, t, device=dev)
        u_out = _alloc(b_img, b_txt, t, device=dev)
        c2_out = _alloc(b_img, b_txt, t, device=dev)
        ieee = regions.dtype == torch.float32
        upcast = _interpret()
        pairs = b_img * b_txt
        _row_lse[(pairs, triton.cdiv(m, cfg["row_block_m"]))](
            regions, words, wok, lse, b_txt, m, t, d,
            regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0),
            lse.stride(0), lse.stride(1),
            BLOCK_M=cfg["row_block_m"], BLOCK_T=cfg["t_pad"], BLOCK_D=cfg["block_d"], IEEE=ieee, UPCAST=upcast,
            num_warps=cfg["num_warps"],
        )
        n_tblk = triton.cdiv(t, cfg["block_t"])
        _fwd[(pairs, n_tblk)](
            regions, words, wok, rok, lse, tau1_t, n_out, u_out, c2_out, b_txt, m, t, d,
            regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0), rok.stride(0),
            lse.stride(0), lse.stride(1), n_out.stride(0), n_out.stride(1),
            BLOCK_M=cfg["block_m"], BLOCK_T=cfg["block_t"], BLOCK_D=cfg["block_d"], IEEE=ieee, UPCAST=upcast,
            num_warps=cfg["num_warps"],
        )
        ctx.save_for_backward(regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t)
        ctx.cfg = cfg
        return u_out, c2_out

    @staticmethod
    def backward(ctx, du, dc2):
        regions, words, wok, rok, lse, n_out, u_out, c2_out, tau1_t = ctx.saved_tensors
        cfg = ctx.cfg
        b_img, m, d = regions.shape
        b_txt, t, _ = words.shape
        dev = regions.device
        du = torch.zeros_like(u_out) if du is None else du.float().contiguous()
        dc2 = torch.zeros_like(c2_out) if dc2 is None else dc2.float().contiguous()
        gam = du
        dlt = (2.0 * dc2).contiguous()
        d_j = (gam * u_out + dlt * c2_out).contiguous()  # sum_m alpha dalpha = dc_j . c_j
        dr = torch.zeros(b_img, m, d, device=dev, dtype=torch.float32)
        de = torch.zeros(b_txt, t, d, device=dev, dtype=torch.float32)
        f = torch.zeros(b_img, b_txt, m, device=dev, dtype=torch.float32)
        n_tblk = triton.cdiv(t, cfg["block_t"])
        pairs = b_img * b_txt
        dtau = _alloc(pairs * n_tblk, device=dev)
        ieee = regions.dtype == torch.float32
        upcast = _interpret()
        common = dict(BLOCK_M=cfg["block_m"], BLOCK_T=cfg["block_t"], BLOCK_D=cfg["block_d"], IEEE=ieee,
                      UPCAST=upcast, num_warps=cfg["num_warps"])
        _bwd_main[(pairs, n_tblk)](
            regions, words, wok, rok, lse, n_out, gam, dlt, d_j, tau1_t, dr, de, f, dtau,
            b_txt, m, t, d, n_tblk,
            regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0), rok.stride(0),
            lse.stride(0), lse.stride(1), n_out.stride(0), n_out.stride(1), dr.stride(0), dr.stride(1),
            de.stride(0), de.stride(1), **common,
        )
        _bwd_row[(pairs, n_tblk)](
            regions, words, wok, lse, f, dr, de, b_txt, m, t, d,
            regions.stride(0), regions.stride(1), words.stride(0), words.stride(1), wok.stride(0),
            lse.stride(0), lse.stride(1), dr.stride(0), dr.stride(1), de.stride(0), de.stride(1), **common,
        )
        dtau1 = dtau.sum() if ctx.needs_input_grad[4] else None
        return dr.to(regions.dtype), de.to(words.dtype), None, None, dtau1


def _check_kernel_inputs(regions: torch.Tensor, words: torch.Tensor) -> None:
    if triton is None:
        from clinvla_engine.backends import BackendUnavailable

        raise BackendUnavailable("local_align needs Triton: pip install 'clinvla-engine[gpu]'")
    if regions.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"local_align takes float32 or bfloat16 regions and words, got {regions.dtype}; "
                         "use the reference (fused=False) for other dtypes")
    if not regions.is_cuda and not _interpret():
        raise ValueError(
            f"local_align (fused=True) needs CUDA tensors, got regions on {regions.device}; move them to a GPU "
            "or use fused=False (the PyTorch reference)"
        )
    t, d = words.shape[1], words.shape[2]
    if t > MAX_T:
        raise ValueError(f"local_align takes at most {MAX_T} words per text, got words {tuple(words.shape)}")
    if d > MAX_D:
        raise ValueError(f"local_align takes D up to {MAX_D}, got D = {d}")


def local_align(
    regions: torch.Tensor,  # (B_img, M, D) float32 or bfloat16
    words: torch.Tensor,  # (B_txt, T, D) same dtype
    word_mask: torch.Tensor,  # (B_txt, T) bool, True = real word
    region_mask: torch.Tensor | None = None,  # (B_img, M) bool, True = real region
    tau1: "float | torch.Tensor" = 4.0,
    tau2: "float | torch.Tensor" = 5.0,
    tau3: "float | torch.Tensor" = 10.0,
) -> torch.Tensor:
    """S (B_img, B_txt) in the input dtype: the fused-kernel version of local_alignment_scores."""
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
