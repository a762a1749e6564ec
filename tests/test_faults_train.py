"""Fault injection for training, checkpoints and evaluation (issue 10).

Kills are real SIGKILLs: of a forked copy of this process running train() (it has torch and the
model code imported already, so a kill and restart costs a second, not the ~15 s of a fresh
interpreter), and in the `slow` case of a real `clinvla train` process. Every run here uses one
thread, so that runs in different processes do the same arithmetic in the same order and their
weights can be compared bit for bit. Each case's outcome is in the README's reliability table.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

import pytest
import torch

from clinvla_engine.cli import main
from clinvla_engine.data import open_dataset
from clinvla_engine.data.study import DatasetError
from clinvla_engine.data.synth import generate_archive
from clinvla_engine.evaluate import EvaluationError, evaluate, quick_validation
from clinvla_engine.model import create_model, load_checkpoint, save_checkpoint
from clinvla_engine.model.checkpoint import CheckpointError, CheckpointWarning
from clinvla_engine.train import STATE_NAME, GlobalBatchSampler, RunDirectory, train

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the kill tests fork this process and watch it through /proc (Linux)")

# small and fast: 4 patches per view, no decoder; a checkpoint after every step, so that kills
# land in checkpoint writing as often as in computing
CFG = {"preset": "tiny", "vision": {"image_size": 32}, "decoder": {"enabled": False}, "loss": {"mim_weight": 0.0},
       "train": {"batch_size": 4, "save_every": 1, "log_every": 1, "warmup_steps": 2, "eval_every": 0}}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "archive"
    generate_archive(out, studies=32, seed=11, fmt="mimic", size=48, split_fractions=(0.8, 0.1, 0.1),
                     progress=False)
    return out


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """An uninterrupted 6-step run: {name: tensor} of its final weights."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference") / "run"
    train(CFG, archive, out, max_steps=6, progress=False)
    return {k: v.clone() for k, v in load_checkpoint(out).state_dict().items()}


def _fork(fn) -> int:
    """Runs fn() in a forked child that ends with os._exit (never returning into pytest)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            torch.set_num_threads(1)
            fn()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, timeout: float = 120.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return f"signal {os.WTERMSIG(status)}"
            return f"exit {os.WEXITSTATUS(status)}"
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def _steps_logged(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _assert_consistent(out) -> int:
    """After any kill: the latest checkpoint is a matching pair, and the published weights load."""
    resumed = RunDirectory(out).open_for_resume()
    assert resumed.state["step"] == resumed.step
    if (out / "model.safetensors").exists():
        load_checkpoint(out)  # complete and its digest verifies (at most one checkpoint behind)
    return resumed.step


def _assert_equal_weights(out, reference) -> None:
    final = load_checkpoint(out).state_dict()
    assert final.keys() == reference.keys()
    assert [k for k in final if not torch.equal(final[k], reference[k])] == []


# ---- SIGKILL during training and checkpointing --------------------------------------------------
def test_random_sigkills_then_resume_equal_the_uninterrupted_run(archive, reference, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(10)
    outcomes = []
    for attempt in range(3):
        start = RunDirectory(out).latest()
        if start is not None and start.name == "step-000000006":
            break  # a child finished the run before its kill
        resume = attempt > 0
        pid = _fork(lambda: train(CFG, archive, out, max_steps=6, resume=resume, progress=False))
        if _wait_for_new_checkpoint(out, start, pid):  # then a random moment of the next step or save
            # a short window: on an idle machine the few remaining tiny steps take well under a second,
            # and a kill after the end would test nothing
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
        outcomes.append(_wait(pid))
        assert outcomes[-1] in ("exit 0", f"signal {signal.SIGKILL}"), outcomes
        _assert_consistent(out)
    assert f"signal {signal.SIGKILL}" in outcomes, outcomes  # at least one kill landed mid-run
    train(CFG, archive, out, max_steps=6, resume=True, progress=False)
    _assert_equal_weights(out, reference)
    assert _steps_logged(out) == [1, 2, 3, 4, 5, 6], outcomes  # no step lost or logged twice
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["step-000000006"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".trash-" in p.name], (os.getpid(), outcomes)


def _wait_for_new_checkpoint(out, start, pid, timeout: float = 120.0) -> bool:
    """True once the child has written a checkpoint newer than `start`; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        latest = RunDirectory(out).latest()
        if latest is not None and latest != start:
            return True
        if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
            return False
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


def _zombie(pid: int) -> bool:
    """An ended child that has not been waited for (waitpid here would reap it before _wait)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill_self_when(name: str, predicate, occurrence: int) -> None:
    """In the child: SIGKILL itself on the `occurrence`-th call of os.<name> / shutil.<name> for
    which predicate(args) holds, before the call does anything."""
    owner = shutil if name == "rmtree" else os
    real = getattr(owner, name)
    seen = [0]

    def wrapper(*args, **kwargs):
        if predicate(*args):
            seen[0] += 1
            if seen[0] == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(owner, name, wrapper)


def _base(p) -> str:
    return os.path.basename(os.fspath(p))


# each: where the kill lands during the save of step 2, and the checkpoint resume must start from
KILL_POINTS = {
    "weights written, state not yet": ("replace", lambda s, d: _base(d) == STATE_NAME, 2, 1),
    "both files written, folder not yet renamed": ("rename", lambda s, d: _base(d).startswith("step-"), 2, 1),
    "folder renamed, published weights not updated": (
        "replace", lambda s, d: _base(d) == "model.safetensors" and _base(os.path.dirname(d)) == "run", 2, 2),
    "old checkpoint moved to trash, not deleted": ("rmtree", lambda p, *a: ".trash-" in _base(p), 1, 2),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_kill_at_each_point_of_a_save_leaves_a_resumable_checkpoint(archive, reference, tmp_path, point):
    name, predicate, occurrence, expected_step = KILL_POINTS[point]
    out = tmp_path / "run"

    def child():
        _kill_self_when(name, predicate, occurrence)
        train(CFG, archive, out, max_steps=6, progress=False)

    assert _wait(_fork(child)) == f"signal {signal.SIGKILL}"
    assert _assert_consistent(out) == expected_step
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 1.0, "glo')  # and a record cut short by the kill
    train(CFG, archive, out, max_steps=6, resume=True, progress=False)
    _assert_equal_weights(out, reference)
    assert _steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".trash-" in p.name]


def test_resuming_a_finished_run_changes_nothing(archive, tmp_path):
    cfg = {**CFG, "train": {**CFG["train"], "eval_every": 1, "save_every": 2}}
    out = tmp_path / "run"
    train(cfg, archive, out, max_steps=3, progress=False)
    log = (out / "metrics.jsonl").read_text()
    assert sum("val_i2t_R@1" in line for line in log.splitlines()) == 3  # after steps 1, 2 and 3
    weights = (out / "model.safetensors").read_bytes()
    result = train(cfg, archive, out, max_steps=3, resume=True, progress=False)
    assert result.steps == 3
    assert (out / "metrics.jsonl").read_text() == log and (out / "model.safetensors").read_bytes() == weights


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_of_the_clinvla_train_command_then_resume(archive, reference, tmp_path):
    """The real command line in its own interpreter (startup ~15 s, hence slow)."""
    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(CFG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "clinvla_engine.cli", "train", "--config", str(cfg_file), "--data", str(archive),
           "--out", str(out), "--max-steps", "6", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 300
    while RunDirectory(out).latest() is None and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(random.Random(3).uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _assert_consistent(out)
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_equal_weights(out, reference)
    assert _steps_logged(out) == [1, 2, 3, 4, 5, 6]


# ---- bad images ------------------------------------------------------------------------------
def _copy(archive, tmp_path):
    dst = tmp_path / "archive"
    shutil.copytree(archive, dst)
    return dst


def _train_order(studies, batch=4, seed=0) -> list:
    train_studies = [s for s in studies if s.split in (None, "train")]
    return [train_studies[i] for i in GlobalBatchSampler(len(train_studies), batch, seed)]


def test_the_loader_layer_skips_or_replaces_a_bad_study_and_says_which(archive, tmp_path):
    from clinvla_engine.data.dataset import Collate, StudyDataset

    data = _copy(archive, tmp_path)
    studies = [s for s in open_dataset(data)][:4]
    studies[1].frontal.write_bytes(b"GIF89a and nothing else")
    kw = dict(image_size=32, mean=0.5, std=0.25)
    skip = StudyDataset(studies, on_bad="skip", **kw)
    batch = Collate(None)([skip[i] for i in range(4)])
    assert batch["index"].tolist() == [0, 2, 3] and batch["frontal"].shape[0] == 3
    [entry] = batch["bad"]
    assert entry["study_id"] == studies[1].study_id and entry["path"] == str(studies[1].frontal)
    replace = StudyDataset(studies, on_bad="replace", **kw)
    item = replace[1]  # the slot goes to the next study, which says whom it stands in for
    assert int(item["index"]) == 2 and [e["study_id"] for e in item["bad"]] == [studies[1].study_id]
    with pytest.raises(DatasetError, match=str(studies[1].frontal)):
        StudyDataset(studies, **kw)[1]  # the default for single use: the error itself
    for s in studies:
        s.frontal.write_bytes(b"")
    with pytest.raises(DatasetError, match="4 studies in a row .* cannot be decoded"):
        replace[0]


def test_a_bad_image_mid_run_is_skipped_logged_and_not_hit_again_on_resume(archive, tmp_path):
    data = _copy(archive, tmp_path)
    victim = _train_order(list(open_dataset(data)))[5]  # in the batch of step 2
    victim.frontal.write_bytes(b"\xff\xd8\xff\xe0 not the rest of a JPEG")
    cfg = {**CFG, "train": {**CFG["train"], "center_heads": False}}  # no probe: the first read is mid-run
    out = tmp_path / "run"
    result = train(cfg, data, out, max_steps=3, progress=False, max_bad_fraction=0.2)
    assert result.steps == 3
    assert [e["study_id"] for e in result.skipped_studies] == [victim.study_id]
    train(cfg, data, out, max_steps=5, resume=True, progress=False, max_bad_fraction=0.2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "skipped_study" in r]
    assert len(skipped) == 1  # logged once, with where and why, across the resume
    assert skipped[0]["skipped_study"] == victim.study_id and skipped[0]["step"] == 2
    assert skipped[0]["path"] == str(victim.frontal) and skipped[0]["reason"]
    assert _steps_logged(out) == [1, 2, 3, 4, 5]


def test_too_many_bad_images_stop_training_with_the_threshold_named(archive, tmp_path, capsys):
    data = _copy(archive, tmp_path)
    for s in _train_order(list(open_dataset(data)))[:3]:
        s.frontal.write_bytes(b"")  # empty files
    out = tmp_path / "run"
    code = main(["train", "--config", str(_write(tmp_path / "cfg.json", CFG)), "--data", str(data), "--out",
                 str(out), "--max-steps", "3", "--quiet", "--max-bad-fraction", "0.05"])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"\d+ of \d+ studies \(\d+\.\d%\) in the training split have images that cannot be decoded", err)
    assert "more than max_bad_fraction 5.0%" in err and "--max-bad-fraction" in err


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_evaluation_leaves_out_bad_images_and_stops_past_the_threshold(archive, tmp_path):
    data = _copy(archive, tmp_path)
    torch.manual_seed(0)
    model = create_model(CFG).eval()
    kw = dict(protocols=("instance",), split="all", per_class=3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "protocol set smaller than asked": a small archive
        before = evaluate(model, data, **kw)
        manifest = tmp_path / "m.json"
        evaluate(model, data, manifest_out=manifest, **kw)
        victim = json.loads(manifest.read_text())["sets"]["5x200"]["candidates"][1]
        with open(victim["frontal"], "r+b") as f:
            f.truncate(40)
        after = evaluate(model, data, max_bad_fraction=0.5, **kw)
        assert after["instance"]["n"] == before["instance"]["n"] - 1
        assert [e["study_id"] for e in after["skipped_studies"]] == [victim["study_id"]]
        assert after["skipped_studies"][0]["path"] == victim["frontal"]
        with pytest.raises(DatasetError, match="1 of .* studies .* more than max_bad_fraction 0.0%"):
            evaluate(model, data, max_bad_fraction=0.0, **kw)


# ---- NaN and collapsed models in evaluation -------------------------------------------------------
def test_nan_weights_are_an_error_that_names_the_checkpoint(archive, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(CFG)
    with torch.no_grad():
        model.image_global_head.fc1.weight.fill_(3e38)  # finite weights whose outputs overflow: NaN embeddings
    path = save_checkpoint(model, tmp_path / "nan.safetensors")
    code = main(["eval", str(path), "--data", str(archive), "--protocols", "instance", "--split", "all",
                 "--per-class", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"checkpoint {path} gives NaN or infinite image embeddings" in err
    with pytest.raises(EvaluationError, match="the model being trained in run7"):
        quick_validation(load_checkpoint(path), list(open_dataset(archive)), source="the model being trained in run7")
    # a NaN inside attention can vanish in the softmax (finite embeddings): the weights are checked too
    torch.manual_seed(0)
    model = create_model(CFG)
    with torch.no_grad():
        model.visual.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    path = save_checkpoint(model, tmp_path / "nan_attn.safetensors")
    assert main(["eval", str(path), "--data", str(archive), "--protocols", "instance", "--split", "all"]) == 2
    assert f"checkpoint {path} has NaN or infinite values in 1 weight tensor(s) (visual.blocks.0.attn.qkv.weight)" \
        in capsys.readouterr().err


def test_constant_embeddings_do_not_score_perfect_recall(archive):
    torch.manual_seed(0)
    model = create_model(CFG).eval()
    with torch.no_grad():
        for head in (model.image_global_head, model.text_global_head):
            head.fc2.weight.zero_()
            head.fc2.bias.fill_(1.0)
    # the training validation: before the fix, every study "found" its report first (R@1 = 1)
    val = quick_validation(model, list(open_dataset(archive)))
    assert val == {"i2t_R@1": 0.0, "i2t_R@5": 0.0, "t2i_R@1": 0.0, "t2i_R@5": 0.0}


# ---- corrupt and concurrent checkpoint files -----------------------------------------------------
def test_a_bit_flip_in_the_weights_is_refused_and_old_checkpoints_warn(tmp_path, capsys, archive):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = create_model(CFG)
    path = save_checkpoint(model, tmp_path / "model.safetensors")
    blob = bytearray(path.read_bytes())
    blob[-7] ^= 0x10  # one bit in the last tensor's data
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"checkpoint {flipped} is corrupt"):
        load_checkpoint(flipped)
    assert main(["eval", str(flipped), "--data", str(archive)]) == 2
    assert "is corrupt" in capsys.readouterr().err
    # written before the digest existed: loads, with a warning that says so and how to fix it
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "content_sha256"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=meta)
    with pytest.warns(CheckpointWarning, match="no content_sha256.*save it again"):
        load_checkpoint(old)


def test_concurrent_saves_to_one_path_leave_one_whole_checkpoint(tmp_path):
    torch.manual_seed(0)
    models = [create_model(CFG), create_model(CFG)]
    path = tmp_path / "model.safetensors"
    errors = []

    def writer(m):
        try:
            for _ in range(4):
                save_checkpoint(m, path)
        except BaseException as exc:  # pragma: no cover - the failure this test looks for
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    loaded = load_checkpoint(path).state_dict()
    assert any(all(torch.equal(loaded[k], m.state_dict()[k]) for k in loaded) for m in models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
