"""Writes clinvla_engine/assets/bundled_vocab.txt: a small uncased WordPiece vocabulary.

The `tiny` preset uses it so that tests need no downloaded tokenizer: every character has a piece,
so any text tokenises, and common radiology words are whole tokens so that sequences stay short.
Run: python tools/make_bundled_vocab.py
"""
from pathlib import Path
import string

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


def main() -> None:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(tokens)
    for word in WORDS:
        for piece in word.replace("-", " - ").split():
            if piece not in seen:
                seen.add(piece)
                tokens.append(piece)
    out = Path(__file__).resolve().parents[1] / "clinvla_engine" / "assets" / "bundled_vocab.txt"
    out.write_text("\n".join(tokens) + "\n")
    print(f"wrote {len(tokens)} tokens to {out}")


if __name__ == "__main__":
    main()
