"""``Engine``: a loaded, verified engine bundle that embeds studies and report texts.

    engine = Engine.load("engine_dir")                  # checks versions and every file's SHA-256
    emb = engine.embed_studies(frontals, laterals)      # (N, E) float32, L2-normalised
    emb, regions, region_mask = engine.embed_studies(frontals, laterals, return_local=True)
    txt = engine.embed_texts(["small left effusion"])   # (N, E)
    engine.info()                                       # what is loaded, from what, how fast it was

Inputs are batched into the bundle's buckets (at most the largest bucket per call of a graph;
static-shape backends pad the last chunk up to the next bucket). On a GPU, inputs are staged in
pinned memory and fixed buckets are replayed as CUDA graphs. Calls may come from several threads:
preprocessing runs in the calling thread, and each graph is either thread-safe (ONNX Runtime, OpenVINO) or
serialised by a per-graph lock.
"""
from __future__ import annotations

import bisect
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .bundle import BundleError, bundle_tokenizer, load_bundle
from .graphs import SPEC_DTYPES, truncate_tokens
from .inputs import as_items, check_texts, preprocess_items
from .runners import Runner, make_runner


def _resolve_device(manifest: dict, device: str | torch.device | None) -> torch.device:
    if device is None:
        device = manifest.get("device", "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


class Engine:
    """A loaded engine bundle; build one with ``clinvla-build-engine``, load it with ``Engine.load``."""

    def __init__(self, directory: Path, manifest: dict, runner: Runner, load_seconds: float):
        self.directory = directory
        self.manifest = manifest
        self.runner = runner
        self.device = runner.device
        self.tokenizer = bundle_tokenizer(directory, manifest)
        cfg = manifest["config"]
        self.image_size = int(cfg["vision"]["image_size"])
        self.pixel_mean = float(cfg["vision"]["pixel_mean"])
        self.pixel_std = float(cfg["vision"]["pixel_std"])
        self.two_views = int(cfg["vision"]["num_views"]) == 2
        self.embed_dim = int(cfg["embed_dim"])
        self.buckets = sorted(int(b) for b in manifest["batch_sizes"])
        self.max_text_len = int(manifest["max_text_len"])
        self.patches = int(manifest.get("patches", (self.image_size // int(cfg["vision"]["patch_size"])) ** 2))
        self.load_seconds = load_seconds
        self.workers = max(1, min(4, os.cpu_count() or 1))
        self._pin = self.device.type == "cuda"

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device | None = None, *,
             verify: bool = True, cuda_graphs: bool = True, threads: int | None = None,
             performance_hint: str | None = None, staging: bool = False) -> "Engine":
        """Loads a bundle after checking its manifest, completeness, versions, file list and
        (verify=True) every file's SHA-256; see clinvla_engine.runtime.bundle.

        device defaults to the one the bundle was built for; an AOTInductor, TensorRT or OpenVINO
        bundle only runs on the device type it was compiled for. threads caps ONNX Runtime's
        intra-op threads and sets OpenVINO's (default: the CPUs this process may use); AOTInductor
        and compile bundles on a CPU use torch's, see torch.set_num_threads. performance_hint
        ("latency", the default, or "throughput") is OpenVINO's: one stream per call, or a call's
        batch split over several streams; other backends have no such switch and refuse it.
        staging=True is for the builder's parity check of a bundle it has not finished; a
        deployment never passes it.
        """
        t0 = time.perf_counter()
        directory, manifest = load_bundle(directory, verify=verify, allow_incomplete=staging)
        device = _resolve_device(manifest, device)
        built_for = manifest.get("device", "cpu")
        if performance_hint is not None and manifest["backend"] != "openvino":
            raise ValueError(f"performance_hint applies to OpenVINO engines only; {directory} is a "
                             f"{manifest['backend']} engine: drop performance_hint")
        if manifest["backend"] in ("aoti", "tensorrt", "openvino") and device.type != built_for:
            raise BundleError(f"engine bundle {directory} was compiled for {built_for} ({manifest['backend']}); "
                              f"it cannot run on {device.type}: rebuild it with --device {device.type}")
        if manifest["backend"] == "aoti" and device.type == "cuda":
            from .aoti_probe import probe_bundle

            probe_bundle(directory, manifest, device)
        runner = make_runner(directory, manifest, device, cuda_graphs=cuda_graphs, threads=threads,
                             performance_hint=performance_hint)
        return cls(directory, manifest, runner, time.perf_counter() - t0)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- graph execution with buckets ---------------------------------------------------------
    def _bucket(self, n: int) -> int:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[min(i, len(self.buckets) - 1)]

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._pin else t

    def run_graph(self, graph: str, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Runs graph inputs of any batch size (split at the largest bucket, padded where the
        backend needs fixed shapes); returns float32 CPU tensors keyed by output name."""
        spec = self.manifest["graphs"][graph]
        names = [t["name"] for t in spec["inputs"]]
        missing = [n for n in names if n not in feeds]
        if missing:
            raise ValueError(f"the {graph} graph needs inputs {names}, missing {missing}")
        n = int(feeds[names[0]].shape[0])
        for name in names:
            self._check_input(graph, name, feeds[name], n)
        tokens = int(feeds[names[0]].shape[1]) if graph == "text" else None
        if graph == "text" and self.runner.static_shapes and tokens < self.max_text_len:
            feeds = _pad_tokens(feeds, self.max_text_len, self.tokenizer.pad_id)
        chunks: list[dict[str, torch.Tensor]] = []
        step = self.buckets[-1]
        for start in range(0, n, step):
            part = {k: v[start:start + step] for k, v in feeds.items()}
            m = int(part[names[0]].shape[0])
            if self.runner.static_shapes and m not in self.buckets:
                part = {k: _pad_rows(v, self._bucket(m)) for k, v in part.items()}
            result = self.runner.run(graph, {k: self._staged(v.contiguous()) for k, v in part.items()}, outputs)
            chunks.append({k: v[:m] for k, v in result.items()})
        out = chunks[0] if len(chunks) == 1 else {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
        if "words" in out and tokens is not None:
            out["words"] = out["words"][:, : tokens - 1]
        return out

    def _check_input(self, graph: str, name: str, x: torch.Tensor, n: int) -> None:
        spec = next(t for t in self.manifest["graphs"][graph]["inputs"] if t["name"] == name)
        want = spec["shape"]
        shape = tuple(x.shape)
        ok = len(shape) == len(want) and shape[0] == n and all(
            isinstance(w, str) or w == s for w, s in zip(want[1:], shape[1:]))
        if graph == "text" and ok:
            ok = 3 <= shape[1] <= self.max_text_len
        dtype = SPEC_DTYPES[spec["dtype"]]
        if not ok or x.dtype != dtype or n == 0:
            want_s = "(" + ", ".join(str(w) for w in want) + ")"
            raise ValueError(f"{graph} graph input {name} must be {want_s} {spec['dtype']}"
                             + (f" with 3..{self.max_text_len} tokens" if graph == "text" else "")
                             + f", got {shape} {str(x.dtype).replace('torch.', '')}")

    # ---- public API ---------------------------------------------------------------------------
    def embed_studies(self, frontal: Any, lateral: Any = None, *, return_local: bool = False,
                      workers: int | None = None):
        """Global image embeddings of N studies: (N, E) float32, L2-normalised.

        frontal: N pictures (uint8 / uint16 / float arrays or tensors, grey (H, W) or with a
        channel axis, any size) or file paths (JPEG, PNG, DICOM), or an (N, H, W) array.
        lateral: None, or N entries where None marks a study without a lateral view.
        Preprocessed exactly as in training. With return_local=True also returns the region
        features (N, M, E) and region_mask (N, M) bool for local re-ranking.
        """
        fronts = as_items(frontal, "frontal")
        if not fronts:
            raise ValueError("frontal is empty: give at least one study")
        if lateral is None:
            laterals = [None] * len(fronts)
        else:
            if not self.two_views:
                raise ValueError("this engine's model takes the frontal view only: pass lateral=None")
            laterals = as_items(lateral, "lateral", allow_none=True)
            if len(laterals) != len(fronts):
                raise ValueError(f"frontal has {len(fronts)} studies but lateral has {len(laterals)}; "
                                 "give one entry per study (None for a study without a lateral view)")
        workers = workers or self.workers
        outputs = ["image_emb", "regions"] if return_local else ["image_emb"]
        s, mean, std = self.image_size, self.pixel_mean, self.pixel_std
        embs, regions, masks = [], [], []
        step = self.buckets[-1]
        for start in range(0, len(fronts), step):
            f_items, l_items = fronts[start:start + step], laterals[start:start + step]
            f, _ = preprocess_items(f_items, s, mean, std, "frontal", workers, self._buffer(len(f_items)))
            feeds = {"frontal": f}
            present = torch.zeros(len(f_items))
            if self.two_views:
                lat, present = preprocess_items(l_items, s, mean, std, "lateral", workers, self._buffer(len(l_items)))
                feeds.update(lateral=lat, lateral_present=present)
            out = self.run_graph("image", feeds, outputs)
            embs.append(out["image_emb"])
            if return_local:
                regions.append(out["regions"])
                masks.append(self._region_mask(present))
        emb = torch.cat(embs).numpy()
        if not return_local:
            return emb
        return emb, torch.cat(regions).numpy(), torch.cat(masks).numpy()

    def _buffer(self, n: int) -> torch.Tensor | None:
        if not self._pin:
            return None
        return torch.empty(n, 3, self.image_size, self.image_size, dtype=torch.float32).pin_memory()

    def _region_mask(self, present: torch.Tensor) -> torch.Tensor:
        n = present.shape[0]
        front = torch.ones(n, self.patches, dtype=torch.bool)
        if not self.two_views:
            return front
        return torch.cat([front, (present > 0.5)[:, None].expand(n, self.patches)], dim=1)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) (N, T) int64 as the text graph takes them (3 <= T <= max_text_len)."""
        from ..data.dataset import report_text

        texts = check_texts(texts)
        ids, mask = self.tokenizer([report_text(t) for t in texts])
        return truncate_tokens(ids, mask, self.max_text_len, self.tokenizer.sep_id, self.tokenizer.pad_id)

    def embed_texts(self, texts: Sequence[str], *, return_local: bool = False):
        """Global text embeddings (N, E) float32, L2-normalised; with return_local=True also the word
        features (N, T-1, E) and word_mask (N, T-1) bool (False for [SEP] and padding)."""
        ids, mask = self.tokenize(texts)
        outputs = ["text_emb", "words"] if return_local else ["text_emb"]
        out = self.run_graph("text", {"input_ids": ids, "attention_mask": mask}, outputs)
        if not return_local:
            return out["text_emb"].numpy()
        word_mask = mask[:, 1:].bool() & (ids[:, 1:] != self.tokenizer.sep_id)
        return out["text_emb"].numpy(), out["words"].numpy(), word_mask.numpy()

    def info(self) -> dict:
        m = self.manifest
        return {
            "bundle": str(self.directory),
            "backend": m["backend"],
            "device": str(self.device),
            "built_for": m.get("device"),
            "precision": m["precision"],
            "batch_sizes": self.buckets,
            "max_text_len": self.max_text_len,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "views": 2 if self.two_views else 1,
            "model": m["config"].get("name"),
            "graphs": m["graphs"],
            "versions": m.get("versions", {}),
            "parity": m.get("parity", {}).get("summary"),
            "built": m.get("created"),
            "load_seconds": round(self.load_seconds, 3),
            "runner": self.runner.describe(),
        }

    def __repr__(self) -> str:
        m = self.manifest
        return f"Engine({str(self.directory)!r}, backend={m['backend']}, device={self.device}, precision={m['precision']})"


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Pads dim 0 to `rows` by repeating the last row: padding rows are valid inputs, never NaN."""
    n = x.shape[0]
    if n >= rows:
        return x
    return torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])])


def _pad_tokens(feeds: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    extra = length - ids.shape[1]
    return {"input_ids": torch.cat([ids, ids.new_full((ids.shape[0], extra), pad_id)], 1),
            "attention_mask": torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)}
