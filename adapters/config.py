"""The ``model:`` and ``cache:`` sections: what :class:`~lorad.adapters.engine.InferenceEngine` and
:class:`~lorad.adapters.cache.AdapterCache` are built from.

Frozen pydantic models (:class:`~lorad.adapters.config_types.ConfigModel`); sizes in bytes
(written ``64MiB`` etc. in the file), everything else in the units its name says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from lorad.adapters.config_types import Allowed, ByteSize, ConfigModel, ConfigPath, Name, NonEmptyStr, StrTuple

__all__ = ["ModelConfig", "CacheConfig", "GenerationConfig", "Device"]

Device = Literal["cpu", "cuda"]


def _existing(what: str) -> AfterValidator:
    def check(path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"got {str(path)!r}; expected an existing {what}")
        return path

    return AfterValidator(check)


class ModelConfig(ConfigModel):
    """The one base model served."""

    config_key = "model"

    name: Name = Field("demo", description="Name of the base model, reported by the API and in /metrics.")
    path: Annotated[ConfigPath | None, _existing("ONNX file")] = Field(
        None, description="The base ONNX file (relative: from the config file's directory); "
                          "null: the embedded demo model.")
    targets: StrTuple = Field(
        ("*",), description="Which MatMul/Gemm weights get a LoRA slot: PEFT-style module names (q_proj matches "
                            "every module path ending in .q_proj), globs over module paths, or ONNX weight names; "
                            "each must match a weight (default for the demo model: its builder's targets).")
    rank: int = Field(8, ge=1, le=1024, description="Slot rank: adapters of smaller rank are zero-padded to it "
                                                    "(default for the demo model: its adapters' rank).")
    device: Device = Field("cpu", description="Execution provider: cpu, or cuda (falls back to cpu, said in "
                                              "the log and in /metrics).")
    intra_op_threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime intra-op threads; 0: let ORT decide.")
    quantized_compute: Literal["int8", "fp32"] = Field(
        "int8", description="How a quantised base's 4- and 8-bit products run: int8 quantises the activations per "
                            "32-value block inside the product, as llama.cpp does (fastest); fp32 multiplies the "
                            "dequantised weights exactly (SmolLM2: 0.6x the decode speed). No effect on float models.")
    weight_names: Annotated[
        dict[NonEmptyStr, NonEmptyStr], Allowed("a mapping of PEFT module names to ONNX weight names"),
    ] = Field(default_factory=dict, json_schema_extra={"default": {}}, description="PEFT module name -> ONNX weight name, an override for exports whose "
                                                "module paths lorad cannot recover (lorad inspect-model shows them).")
    # Text models (adapters.text_input): a model built by `lorad import-model` declares its
    # tokenizer, label names and token limit in its metadata; these keys override them.
    tokenizer: Annotated[ConfigPath | None, _existing("file: a tokenizer.json file of the Hugging Face tokenizers library")] = Field(
        None, description="tokenizer.json (Hugging Face tokenizers) for a text model's BYTES input 'text', instead "
                          "of the one the model declares (relative: from the config file's directory); null: the "
                          "model's own.")
    labels: StrTuple | None = Field(
        None, description="Names of the classification head's classes, in order, returned as output 'label'; "
                          "their number must be the model's class count; null: the names the model declares.")
    max_text_tokens: Annotated[int, Field(ge=3, le=1_000_000)] | None = Field(
        None, description="Most tokens one text may have, special tokens included; longer texts get a 400 (never "
                          "cut); null: what the model declares, else 512.")


class CacheConfig(ConfigModel):
    """The in-memory adapter cache."""

    config_key = "cache"

    budget_bytes: ByteSize = Field(64 * 1024**2, gt=0, description="Bytes of adapter weights kept in memory; "
                                                                   "least recently used adapters go first.")
    merged_bytes: ByteSize = Field(128 * 1024**2, ge=0, description="The merged fast path: the adapter that answers "
                                   "most of the recent requests is folded into a copy of the target weights, served at "
                                   "the base model's cost; the most that copy may take (fp32 target weights; MiniLM "
                                   "needs 43 MB). 0: off. Not for quantised targets or decoders.")


class GenerationConfig(ConfigModel):
    """Text generation of a decoder language model (``lorad import-model gguf``); unused for other models."""

    config_key = "generation"

    max_concurrent: int = Field(8, ge=1, le=1024, description="Generations running at once; they share each decode "
                                                            "step (one forward for all, each with its own adapter). "
                                                            "More get a 503.")
    kv_cache_bytes: ByteSize = Field(64 * 1024**2, gt=0, description="KV cache budget shared by all generations: "
                                     "each reserves prompt + max_tokens tokens (SmolLM2-135M: 46,080 bytes a token), "
                                     "padded to the longest; a generation that does not fit now gets a 503.")
    max_context: int = Field(2048, ge=2, description="Most tokens (prompt + max_tokens) one generation may have "
                             "(at most the model's position limit); more is a 400.")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that gives none.")
    prefill_chunk_tokens: int = Field(128, ge=1, le=65536, description="Prompt tokens run per step of the generation "
                                      "loop: a long prompt is prefilled in chunks between the decode steps of running "
                                      "generations, so they do not stall for the whole prompt.")
