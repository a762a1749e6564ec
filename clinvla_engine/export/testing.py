"""Small engine bundles for tests and the GPU suite, built once per process.

The tiny preset's AOTInductor compile takes about a minute on a 2-core CPU, so the test files share
one ``auto`` build (which builds and keeps every CPU candidate) instead of compiling per test.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

TEST_BATCH_SIZES = (1, 4, 8)
TEST_TEXT_LEN = 48


def tiny_model(seed: int = 0):
    """The tiny preset with its adapters switched on (their up-projections start at zero)."""
    from ..model import create_model

    torch.manual_seed(seed)
    model = create_model("tiny")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".up." in name:
                p.normal_(0, 0.02)
    return model.eval()


def tiny_checkpoint(directory: str | Path, seed: int = 0) -> Path:
    """A `clinvla train`-style output folder (model.safetensors + config.json) of a tiny model."""
    from ..model import save_checkpoint

    directory = Path(directory)
    if not (directory / "model.safetensors").is_file():
        save_checkpoint(tiny_model(seed), directory)
    return directory


@functools.lru_cache(maxsize=None)
def cpu_bundles(root: str) -> dict[str, Path]:
    """{"checkpoint", "auto", "onnxruntime", "aoti"}: one auto build on the CPU keeping both candidates."""
    from .build import build_engine

    root_path = Path(root)
    ck = tiny_checkpoint(root_path / "ckpt")
    build_engine(ck, root_path / "auto", backend="auto", device="cpu", batch_sizes=TEST_BATCH_SIZES,
                 max_text_len=TEST_TEXT_LEN, parity_studies=24, keep_candidates=root_path / "candidates",
                 progress=False, force=True)
    return {"checkpoint": ck, "auto": root_path / "auto", "onnxruntime": root_path / "candidates" / "onnxruntime",
            "aoti": root_path / "candidates" / "aoti"}


@functools.lru_cache(maxsize=None)
def bundle(root: str, backend: str, device: str, precision: str = "fp32") -> Path:
    """One tiny bundle of a given backend/device/precision (GPU suite), built once per process."""
    from .build import build_engine

    root_path = Path(root)
    ck = tiny_checkpoint(root_path / "ckpt")
    out = root_path / f"{backend}-{device}-{precision}"
    build_engine(ck, out, backend=backend, device=device, precision=precision, batch_sizes=TEST_BATCH_SIZES,
                 max_text_len=TEST_TEXT_LEN, parity_studies=24, progress=False, force=True)
    return out
