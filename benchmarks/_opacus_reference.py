"""The reference encoder in torch with LoRA, trained with Opacus (hooks mode): the
comparison point of ``benchmarks/training.py``. Importing this module fails with
ImportError when torch or opacus is missing; lorad itself never imports torch.

Same weights as the ONNX model (read from its initializers), same LoRA targets and rank,
sum-reduced cross-entropy, per-example clipping and noise by Opacus' DPOptimizer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import opacus  # type: ignore[import-not-found, unused-ignore]
import torch  # type: ignore[import-not-found, unused-ignore]
from onnx import numpy_helper

from benchmarks.timing import median_seconds

__all__ = ["step_ms", "main"]


def _frozen_linear(inits: dict[str, np.ndarray], prefix: str) -> Any:
    w = inits[f"{prefix}.weight"]  # ONNX orientation [in, out]
    layer = torch.nn.Linear(w.shape[0], w.shape[1])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w.T.copy()))
        layer.bias.copy_(torch.from_numpy(inits[f"{prefix}.bias"]))
    layer.requires_grad_(False)
    return layer


class _LoraLinear(torch.nn.Module):  # type: ignore[misc, unused-ignore]
    def __init__(self, inits: dict[str, np.ndarray], prefix: str, rank: int) -> None:
        super().__init__()
        self.base = _frozen_linear(inits, prefix)
        self.lora_a = torch.nn.Linear(self.base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, self.base.out_features, bias=False)
        torch.nn.init.zeros_(self.lora_b.weight)
        self.scale = 2.0  # alpha = 2·rank, as the ONNX benchmark

    def forward(self, x: Any) -> Any:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale


def _norm(inits: dict[str, np.ndarray], prefix: str) -> Any:
    gamma = inits[f"{prefix}.weight"]
    norm = torch.nn.LayerNorm(gamma.shape[0], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(gamma))
        norm.bias.copy_(torch.from_numpy(inits[f"{prefix}.bias"]))
    norm.requires_grad_(False)
    return norm


class _Layer(torch.nn.Module):  # type: ignore[misc, unused-ignore]
    def __init__(self, inits: dict[str, np.ndarray], i: int, rank: int, heads: int) -> None:
        super().__init__()
        p = f"layers.{i}"
        self.heads = heads
        self.norm1, self.norm2 = _norm(inits, f"{p}.norm1"), _norm(inits, f"{p}.norm2")
        self.q, self.k, self.v, self.o = (_LoraLinear(inits, f"{p}.attn.{n}_proj", rank) for n in "qkvo")
        self.up = _LoraLinear(inits, f"{p}.ffn.up_proj", rank)
        self.down = _LoraLinear(inits, f"{p}.ffn.down_proj", rank)

    def forward(self, x: Any) -> Any:
        n, s, d = x.shape
        h = self.norm1(x)
        q, k, v = (t(h).reshape(n, s, self.heads, d // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.o((att @ v).transpose(1, 2).reshape(n, s, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class _Encoder(torch.nn.Module):  # type: ignore[misc, unused-ignore]
    def __init__(self, model: onnx.ModelProto, rank: int, heads: int = 6) -> None:
        super().__init__()
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        count = len({k.split(".")[1] for k in inits if k.startswith("layers.")})
        self.layers = torch.nn.ModuleList(_Layer(inits, i, rank, heads) for i in range(count))
        self.norm = _norm(inits, "final_norm")
        self.head = _frozen_linear(inits, "head")

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


def step_ms(model: onnx.ModelProto, *, batch: int, rank: int, repeats: int) -> float:
    """Median ms of one Opacus DP-SGD step (hooks mode) at ``batch``."""
    net = opacus.GradSampleModule(_Encoder(model, rank))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.AdamW(params, lr=1e-3), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
    )
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    rng = np.random.default_rng(batch)
    seq, d = 16, net._module.norm.normalized_shape[0]
    x = torch.from_numpy(rng.normal(size=(batch, seq, d)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch).astype(np.int64))

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()

    return median_seconds(step, repeats) * 1e3


def main() -> None:
    """``python -m benchmarks._opacus_reference --batches 16 64 --repeats 15``: one JSON line
    ``{"16": ms, "64": ms}`` (run by benchmarks/training.py with the torch environment)."""
    import argparse
    import json
    import os

    from benchmarks.reference_encoder import build_reference_encoder

    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as ONNX Runtime's default intra-op pool: one per core
    model = build_reference_encoder()
    print(json.dumps({str(b): step_ms(model, batch=b, rank=args.rank, repeats=args.repeats) for b in args.batches}))


if __name__ == "__main__":
    main()
