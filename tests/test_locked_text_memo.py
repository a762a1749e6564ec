"""The locked-text cache is built once per process for runs whose text tower computes the same
function on the same reports (the demo's and the claims study's arms and seeds), and never shared
with a run where that is not so."""
import pytest
import torch

from clinvla_engine.data.study import Study
from clinvla_engine.model import create_model
from clinvla_engine.model.adapters import Adapter
from clinvla_engine.train import locked_text
from clinvla_engine.train.locked_text import LockedTextFeatures

REPORTS = ["Small right pleural effusion.", "No acute cardiopulmonary process.",
           "Moderate cardiomegaly with mild edema.", "Left lower lobe consolidation, no pneumothorax."] * 3


def studies(reports=REPORTS):
    return [Study(study_id=f"s{i}", frontal=f"/nowhere/{i}.png", report=r) for i, r in enumerate(reports)]


def model(seed, **extra):
    torch.manual_seed(seed)
    return create_model({"preset": "tiny", **extra}).eval()


def features(m, st, content=True):
    return LockedTextFeatures(m, st, True, torch.device("cpu"), None, batch_size=5, content=content)


@pytest.fixture(autouse=True)
def empty_memo():
    locked_text._MEMO.clear()
    yield
    locked_text._MEMO.clear()


def reseeded_adapters(seed):
    """The tiny model (random text weights from seed 0) with its adapters drawn from `seed`, as a
    pretrained tower (MiniLM: the same weights in every run) gets them in a run of another seed."""
    m = model(0)
    torch.manual_seed(seed)
    with torch.no_grad():
        for mod in m.text.modules():
            if isinstance(mod, Adapter):
                torch.nn.init.trunc_normal_(mod.down.weight, std=0.02)
    return m


def test_same_tower_function_reuses_the_cache_with_identical_values():
    a = features(reseeded_adapters(0), studies())
    b = features(reseeded_adapters(1), studies())  # down-projections differ, up = 0: the same function
    assert not a.reused and b.reused and all(x is y for x, y in zip(b.cache, a.cache))
    assert not features(model(2), studies()).reused  # other random text weights: another function
    locked_text._MEMO.clear()
    fresh = features(reseeded_adapters(1), studies())
    assert not fresh.reused
    for x, y in zip(fresh.cache, b.cache):
        assert torch.equal(x, y)


def test_a_different_function_or_different_reports_builds_its_own():
    m0 = model(0)
    first = features(m0, studies())
    trained = model(0)
    adapters = [mod for mod in trained.text.modules() if isinstance(mod, Adapter)]
    assert adapters, "the tiny text tower has adapters"
    with torch.no_grad():
        adapters[0].up.bias.fill_(0.01)  # no longer the identity
    assert not features(trained, studies()).reused
    assert not features(m0, studies(REPORTS[::-1])).reused  # other reports (or order)
    content = features(m0, studies(REPORTS[::-1]))
    words = features(m0, studies(REPORTS[::-1]), content=False)  # another word mask, the same states
    assert content.reused and words.reused and not torch.equal(content.cache[1], first.cache[1])
    assert torch.equal(words.cache[1], content.cache[1])
    assert (content.cache[2] <= words.cache[2]).all() and content.cache[2].sum() < words.cache[2].sum()
    locked_text._MEMO.clear()
    fresh = features(m0, studies(REPORTS[::-1]), content=False)
    for x, y in zip(fresh.cache, words.cache):
        assert torch.equal(x, y)


def test_the_cache_holds_what_the_tower_computes_for_each_batch():
    # the cache encodes the reports in chunks (here 5) and looks them up by index; per batch, the
    # tower runs on the batch's reports: the same states on every word, at float32 rounding (the
    # chunks and batches group and pad their reports differently), and the same content-word mask
    m = model(0)
    st = studies()
    cached = features(m, st)
    direct = LockedTextFeatures(m, st, False, torch.device("cpu"), None, content=True)
    index = torch.tensor([7, 0, 11, 3])
    ids, att, content_mask = m.tokenizer([st[i].report for i in index.tolist()], content_mask=True)
    batch = {"index": index, "input_ids": ids, "attention_mask": att, "content_mask": content_mask}
    (c1, w1, m1), (c2, w2, m2) = cached(batch), direct(batch)
    t = min(w1.shape[1], w2.shape[1])
    assert m1.any() and torch.equal(m1[:, :t], m2[:, :t]) and not m1[:, t:].any() and not m2[:, t:].any()
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1[:, :t][m1[:, :t]], w2[:, :t][m2[:, :t]], atol=1e-5, rtol=1e-5)
    assert (w1[:, :t][m1[:, :t]] - features(model(2), st)(batch)[1][:, :t][m1[:, :t]]).abs().max() > 1e-2
