"""The Ray Data executor of ``embed_archive`` (extra ``[distributed]``: ``pip install 'ray[data]'``).

    decode: map_batches(_decode_batch) on CPU tasks   (the local executor's decode_task)
    engine: map_batches(_EngineActor) on an actor pool, num_gpus=1 per actor where GPUs exist
    write:  the driver iterates the results and commits them with the same BufferedWriter

Rows come from the same ``build_rows`` as the local executor, and the writer (so exactly-once and
--resume) stays in the driver process: only the embedding work is distributed. On a cluster, start
Ray on every node and pass ``--ray-address auto`` (or set RAY_ADDRESS); the engine bundle and the
archive must be at the same path on every node (a shared file system).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .embed import EngineStage, StudyTask, build_rows, decode_task
from .store import error_row


def _require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"the ray executor needs Ray Data ({exc}): pip install 'clinvla-engine[distributed]' "
                           "(or pip install 'ray[data]'), or use --executor local") from None
    return ray


def _decode_batch(batch: dict, size: int) -> dict:
    """Ray batch of tasks -> decoded pictures; a failed study keeps its row with an error string."""
    n = len(batch["key"])
    front = np.zeros((n, size, size), np.float32)
    lat = np.zeros((n, size, size), np.float32)
    has_lat = np.zeros(n, bool)
    errors, inputs = [], []
    for i in range(n):
        lateral = batch["lateral"][i] or None
        key, f, l, err = decode_task(StudyTask(str(batch["key"][i]), str(batch["frontal"][i]), lateral), size)
        errors.append("" if err is None else err[1])
        inputs.append("" if err is None else str(err[0]))
        if err is None:
            front[i] = f
            if l is not None:
                lat[i] = l
                has_lat[i] = True
    return {"key": batch["key"], "frontal": front, "lateral": lat, "has_lateral": has_lat,
            "error": np.array(errors, dtype=object), "error_input": np.array(inputs, dtype=object)}


class _EngineActor:
    def __init__(self, engine_dir: str, local_features: str):
        from ..runtime import Engine

        # the device the bundle was built for: a cuda bundle's actor holds one GPU (num_gpus=1)
        self.engine = Engine.load(engine_dir)
        self.stage = EngineStage(self.engine, local_features)
        self.dim = self.engine.embed_dim

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        errors = list(batch["error"])
        stage_of = ["decode" if e else "" for e in errors]
        good = [i for i in range(n) if not errors[i]]
        emb = np.zeros((n, self.dim), np.float32)
        out = {}
        if good:
            fronts = [batch["frontal"][i] for i in good]
            lats = [batch["lateral"][i] if batch["has_lateral"][i] else None for i in good]
            ok, e, local, bad = self.stage(fronts, lats)
            for j, reason in bad:
                errors[good[j]] = reason
                stage_of[good[j]] = "embed"
            rows = [good[j] for j in ok]
            if rows:
                emb[rows] = e
            if local is not None:
                feats = np.zeros((n,) + local[0].shape[1:], np.float16)
                mask = np.zeros((n,) + local[1].shape[1:], bool)
                feats[rows], mask[rows] = local
                out.update(local_features=feats, local_mask=mask)
        return {"key": batch["key"], "has_lateral": batch["has_lateral"], "embedding": emb,
                "error": np.array(errors, dtype=object), "stage": np.array(stage_of, dtype=object),
                "error_input": batch["error_input"], **out}


def run_ray(tasks: list[StudyTask], metas_by_key: dict, engine_dir: str | os.PathLike, writer, *, workers: int,
            batch_size: int, local_features: str, fingerprint: str, bar, address: str | None = None,
            actors: int | None = None) -> tuple[int, int]:
    ray = _require_ray()
    from ..runtime import read_manifest

    _, manifest = read_manifest(engine_dir)
    size = int(manifest["config"]["vision"]["image_size"])
    connected_here = not ray.is_initialized()
    if connected_here:
        # an existing cluster when one is named (or RAY_ADDRESS is set), else a local instance
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 ignore_reinit_error=True, log_to_driver=False,
                 **({} if (address or os.environ.get("RAY_ADDRESS")) else {"num_cpus": max(2, workers + 1)}))
    try:
        return _run(ray, tasks, metas_by_key, engine_dir, writer, workers=workers, batch_size=batch_size,
                    local_features=local_features, fingerprint=fingerprint, bar=bar, size=size,
                    manifest=manifest, actors=actors)
    finally:
        if connected_here:
            # the connection (and a local instance) ends with the run, not at interpreter exit, where
            # Ray's shutdown runs beside other libraries' teardown
            ray.shutdown()


def _run(ray, tasks, metas_by_key, engine_dir, writer, *, workers, batch_size, local_features, fingerprint, bar,
         size, manifest, actors) -> tuple[int, int]:
    # GPU actors only for a bundle built for CUDA; a CPU bundle runs on CPU actors even on GPU nodes
    gpus = int(ray.cluster_resources().get("GPU", 0)) if manifest.get("device", "cpu") == "cuda" else 0
    actors = actors or max(1, gpus)
    ds = ray.data.from_items([{"key": t.key, "frontal": t.frontal, "lateral": t.lateral or ""} for t in tasks],
                             override_num_blocks=max(1, min(len(tasks), 4 * max(1, workers))))
    ds = ds.map_batches(_decode_batch, fn_kwargs={"size": size}, batch_size=8, num_cpus=1, batch_format="numpy")
    ds = ds.map_batches(_EngineActor, fn_constructor_args=(str(Path(engine_dir).resolve()), local_features),
                        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=1 if gpus else 0,
                        num_cpus=0 if gpus else 1, batch_format="numpy")
    embedded = failed = 0
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        keys = [str(k) for k in out["key"]]
        errs = []
        ok = []
        for i, key in enumerate(keys):
            if out["error"][i]:
                stage = str(out["stage"][i])
                where = str(out["error_input"][i]) if stage == "decode" else metas_by_key[key].frontal_path
                errs.append(error_row(where, stage, str(out["error"][i]), key))
            else:
                ok.append(i)
        local = None
        if "local_features" in out:
            local = (out["local_features"][ok], out["local_mask"][ok])
        rows = build_rows([metas_by_key[keys[i]] for i in ok], out["has_lateral"][ok], out["embedding"][ok], local,
                          fingerprint) if ok else None
        writer.add(rows, errs)
        embedded += len(ok)
        failed += len(errs)
        bar.update(len(keys))
        bar.set_postfix(errors=failed, refresh=False)
    return embedded, failed
