"""Loads and runs one AOTInductor package in a child process, so that a crash is a result.

On the H200 (torch 2.11, CUDA 13) ``aoti_load_package`` of a ViT-B/16 package was seen to die with
a segmentation fault. A crash inside the loader cannot be caught in-process, so the builder (and
the runtime, when a bundle meets a machine other than the one it was built on) first runs the
package here, in a fresh interpreter, and reads the exit status: 0 = loaded and produced finite
outputs; a negative status = killed by that signal (-11 = SIGSEGV).

    python -m clinvla_engine.runtime.aoti_probe '{"package": ..., "constants": null,
        "device": "cuda", "inputs": [{"name": ..., "dtype": ..., "shape": [...], "high": 100}]}'
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def probe(package: str, constants: str | None, device: str, inputs: list[dict], timeout: float = 300.0) -> dict:
    """Runs the package in a child process; returns {"ok", "returncode", "signal", "seconds", "output"}."""
    spec = json.dumps({"package": package, "constants": constants, "device": device, "inputs": inputs})
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "clinvla_engine.runtime.aoti_probe", spec],
                              capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        code, output = None, f"timed out after {timeout:.0f} s: {exc}"
    result = {"ok": code == 0, "returncode": code, "seconds": round(time.perf_counter() - t0, 2),
              "output": "\n".join(output.strip().splitlines()[-12:])}
    if code is not None and code < 0:
        try:
            result["signal"] = signal.Signals(-code).name
        except ValueError:
            result["signal"] = f"signal {-code}"
    return result


def probe_inputs(manifest: dict, graph: str, batch: int) -> list[dict]:
    """The probe's input specs for one graph of a (provisional) manifest, at one batch size."""
    vocab = int(manifest["config"]["text"]["bert"].get("vocab_size", 100))
    out = []
    for t in manifest["graphs"][graph]["inputs"]:
        shape = [batch if d == "batch" else (min(16, manifest["max_text_len"]) if d == "tokens" else d) for d in t["shape"]]
        out.append({"name": t["name"], "dtype": t["dtype"], "shape": shape, "high": vocab})
    return out


def machine_fingerprint(device) -> dict:
    """What decides whether a package that loaded once will load again: torch, CUDA and the GPU."""
    import torch

    fp = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        fp["gpu"] = torch.cuda.get_device_name(device)
        fp["capability"] = list(torch.cuda.get_device_capability(device))
    return json.loads(json.dumps(fp))


def probe_bundle(directory: Path, manifest: dict, device) -> None:
    """An AOTInductor bundle on a GPU it was not probed on is first run in a child process: a
    loader crash then becomes a BundleError instead of killing this process."""
    from .bundle import BundleError

    fp = machine_fingerprint(device)
    if manifest.get("aoti", {}).get("fingerprint") == fp or os.environ.get("CLINVLA_AOTI_NO_PROBE") == "1":
        return
    for name, g in manifest["graphs"].items():
        consts = str(directory / g["constants"]) if g.get("constants") else None
        inputs = probe_inputs(manifest, name, batch=min(manifest["batch_sizes"]))
        result = probe(str(directory / g["file"]), consts, str(device), inputs)
        if not result["ok"]:
            raise BundleError(
                f"engine bundle {directory}: the AOTInductor package {g['file']} crashed when loaded on this "
                f"machine ({result.get('signal') or 'exit ' + str(result['returncode'])}); rebuild here with "
                f"clinvla-build-engine --backend compile (or auto). Probe output:\n{result['output']}"
            )


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    import torch

    from .runners import load_aoti_package

    faulthandler.enable()  # a crash prints the Python stack into the probe's output
    spec = json.loads((argv or sys.argv[1:])[0])
    device = torch.device(spec["device"])
    print(f"loading {spec['package']} on {device}", flush=True)
    module = load_aoti_package(Path(spec["package"]), device,
                               Path(spec["constants"]) if spec.get("constants") else None)
    print("loaded", flush=True)
    g = torch.Generator().manual_seed(0)
    xs = []
    for t in spec["inputs"]:
        if t["dtype"] == "int64":
            x = torch.randint(0, int(t.get("high", 100)), t["shape"], generator=g)
            if t["name"] == "attention_mask":
                x = torch.ones(t["shape"], dtype=torch.long)
        else:
            x = torch.randn(t["shape"], generator=g)
            if t["name"] == "lateral_present":
                x = torch.ones(t["shape"])
        xs.append(x.to(device))
    with torch.inference_mode():
        outs = module(*xs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    bad = [i for i, o in enumerate(outs) if not torch.isfinite(o.float()).all()]
    print(json.dumps({"outputs": [list(o.shape) for o in outs], "nonfinite": bad}), flush=True)
    return 0 if not bad else 3


if __name__ == "__main__":
    sys.exit(main())
