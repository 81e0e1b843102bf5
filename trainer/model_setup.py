"""What training needs of the served model, and every check that needs no private data.

One place decides, for an adapter's configuration on the model being served:

- the **loss output**: ``trainer.output``, else the model's ``logits`` when it has one (an
  imported text model's first output is its sentence embedding, not its class scores),
  else its first output;
- the **loss**: ``trainer.loss``, else ``causal_lm`` for a decoder language model (its
  examples are texts: trainer/lm_examples.py), else ``cross_entropy``;
- the **padded length** of dynamic dimensions: ``trainer.pad_length``, else a text model's
  token limit (``model.max_text_tokens``, else what the model declares: 64 in
  examples/intents), else a language model's window (``trainer.window_tokens``), else 128
  — a fixed length that does not depend on the data;
- the **rows per pass** of a step (``trainer.part_rows``, else 2 windows for a language
  model, else for a text model as many examples as fill :data:`DEFAULT_PART_TOKENS`
  tokens, else the whole batch);
- the training **artifacts** a run builds (:func:`artifact_config_for`).

:func:`preflight` runs every check a run could otherwise fail for a reason knowable from
the model and the configuration alone: the artifacts build (every op on the way back has
a gradient rule, every target reaches the loss output), the loss output fits the loss,
label names fit its classes, and the validation gate can score a batch of the model's
shape. :class:`~lorad.trainer.run.TrainingRun` calls it before the ledger is charged,
and ``lorad check-config`` calls it too, so nothing is charged for a run that cannot
succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorad.adapters.engine import TensorSpec
from lorad.adapters.llama_builder import LLM_CONFIG_KEY
from lorad.adapters.service import AdapterService

from .artifacts import ArtifactConfig, Backend, Loss, TrainingArtifacts, build_artifacts
from .batching import TensorLayout
from .config import AdapterTrainingConfig
from .errors import BadTrainingDataError
from .lm_examples import lm_scores, serving_feeds, windows_of
from .validation import per_example_scores

__all__ = [
    "TrainingSetupError", "DEFAULT_PAD_LENGTH", "DEFAULT_PART_TOKENS", "is_language_model", "training_loss", "loss_output", "pad_length",
    "part_rows", "artifact_config_for", "training_layouts", "preflight",
]

#: Padded length of a dynamic dimension of a model that is not a text model.
DEFAULT_PAD_LENGTH = 128
#: Tokens one pass of a text model's step takes by default: a batch runs in parts of
#: ``max(1, 512 // pad_length)`` examples (8 at examples/intents' 64 tokens), their clipped
#: sums carried in float64 into the last part (trainer/portable.py): the same update, with
#: a part's activations still in cache when its backward pass reads them, and less memory.
#: Measured on MiniLM (one thread, 64 tokens, process CPU time, interleaved, a 2-core EPYC
#: with 32 MB of L3, load ~2): a step of 64 examples in parts of 8 0.84x the time of the
#: batch whole (parts of 4: 0.87x, of 16: 0.84x), of 16 examples 0.99x; at load ~4, 0.77x
#: and 0.93x. At 32 tokens, 16 examples a part ran as fast as 8 and 12% faster than 4.
DEFAULT_PART_TOKENS = 512
#: Windows one pass of a language model's step takes by default. Measured on SmolLM2-135M,
#: each 64-token window holds about 200 MB while its backward runs (2.6 MB per token: the
#: stored activations of 30 layers, and its 49,152 logits), beside a 360 MB session.
DEFAULT_LM_PART_ROWS = 2


class TrainingSetupError(BadTrainingDataError, ValueError):
    """The model and the ``trainer`` configuration cannot train; nothing was charged.
    ``key`` is the setting to change."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}")


def is_language_model(service: AdapterService) -> bool:
    """Whether the served model is a decoder language model (``lorad import-model gguf``)."""
    return any(p.key == LLM_CONFIG_KEY for p in service.engine.base_model.metadata_props)


def training_loss(service: AdapterService, config: AdapterTrainingConfig) -> Loss:
    """The loss an adapter trains with (see the module docstring)."""
    if config.loss is not None:
        return config.loss
    return "causal_lm" if is_language_model(service) else "cross_entropy"


def part_rows(service: AdapterService, config: AdapterTrainingConfig) -> int | None:
    """Rows one pass of a training step takes at most (None: the whole batch; see the
    module docstring)."""
    if config.part_rows is not None:
        return config.part_rows
    if is_language_model(service):
        return DEFAULT_LM_PART_ROWS
    if service.text is not None:
        return max(1, DEFAULT_PART_TOKENS // pad_length(service, config))
    return None


def loss_output(service: AdapterService, config: AdapterTrainingConfig) -> TensorSpec:
    """The model output the loss reads (see the module docstring)."""
    outputs = list(service.model_outputs)
    names = [o.name for o in outputs]
    if config.output is not None:
        if config.output not in names:
            raise TrainingSetupError("trainer.output", f"{config.output!r} is not an output of the model; "
                                     f"its outputs: {', '.join(names)}")
        return outputs[names.index(config.output)]
    return outputs[names.index("logits")] if "logits" in names else outputs[0]


def pad_length(service: AdapterService, config: AdapterTrainingConfig) -> int:
    """The fixed length every dynamic dimension of a training batch is padded to (see the
    module docstring): never longer than the model takes, never sized by the data."""
    if config.pad_length is not None:
        return config.pad_length
    if service.text is not None:
        return service.text.max_tokens
    return config.window_tokens if is_language_model(service) else DEFAULT_PAD_LENGTH


def artifact_config_for(service: AdapterService, c: AdapterTrainingConfig) -> ArtifactConfig:
    """The private training artifacts an adapter with config ``c`` trains with."""
    return ArtifactConfig(
        # The serving targets exactly: the adapter's fingerprint must be the engine's.
        targets=tuple(t.weight for t in service.engine.targets),
        rank=c.rank, alpha=c.alpha, use_rslora=c.use_rslora, freeze_a=c.freeze_a, private=True,
        loss=training_loss(service, c), output=loss_output(service, c).name, optimizer=c.optimizer, weight_decay=c.weight_decay,
        init_seed=c.init_seed, a_init=c.a_init,
    )


def training_layouts(artifacts: TrainingArtifacts) -> list[TensorLayout]:
    """Model inputs then the label, as the training graph declares them."""
    layouts = [
        TensorLayout(name, np.dtype(dtype), tuple(shape))
        for name, dtype, shape in zip(artifacts.data_inputs, artifacts.input_dtypes, artifacts.input_shapes, strict=True)
    ]
    label = next(t for t in layouts if t.name == artifacts.label_input)
    if layouts[-1] is not label:
        raise BadTrainingDataError(f"training graph inputs {artifacts.data_inputs} do not end with the label")
    return layouts


def preflight(
    service: AdapterService, config: AdapterTrainingConfig, *, cache_dir: Path, backend: Backend,
) -> TrainingArtifacts:
    """Every check that needs no private data (see the module docstring); returns the
    artifacts, built or found in ``cache_dir``. Raises :class:`TrainingSetupError`."""
    output = loss_output(service, config)
    _check_loss_output(service, config, output)
    try:
        artifacts = build_artifacts(service.engine.base_model, artifact_config_for(service, config),
                                    cache_dir=cache_dir, backend=backend, model_digest=service.engine.model_digest,
                                    isolate=True)
    except ValueError as e:  # UnsupportedNodeError included: the message names the op or the target
        raise TrainingSetupError(_key_of(str(e)), f"the model cannot be trained with output {output.name!r}: {e}") from e
    if config.rank > service.engine.rank:
        raise TrainingSetupError("trainer.rank", f"rank {config.rank} exceeds the serving slot rank "
                                 f"{service.engine.rank}; lower it or raise model.rank")
    _check_gate(service, config, output)
    return artifacts


def _check_loss_output(service: AdapterService, config: AdapterTrainingConfig, output: TensorSpec) -> None:
    loss = training_loss(service, config)
    if is_language_model(service) != (loss == "causal_lm"):
        raise TrainingSetupError(
            "trainer.loss", f"{loss} is not a loss of this model; "
            + ("a language model trains on its text with causal_lm (or leave trainer.loss unset)"
               if is_language_model(service) else "causal_lm needs a decoder language model (lorad import-model gguf)"))
    if loss == "causal_lm":
        if len(output.shape) != 3:
            raise TrainingSetupError("trainer.output", f"causal_lm needs next-token logits [N, T, vocab]; output "
                                     f"{output.name!r} has shape {list(output.shape)}{_other_outputs(service, output)}")
        return
    if loss != "cross_entropy":
        return
    if len(output.shape) != 2:
        raise TrainingSetupError(
            "trainer.output", f"cross_entropy needs class scores [N, classes]; output {output.name!r} has shape "
            f"{list(output.shape)}{_other_outputs(service, output)}")
    classes = output.shape[1] if output.shape[1] > 0 else None
    labels = service.text.labels if service.text is not None else ()
    if labels and classes is not None and len(labels) != classes:
        raise TrainingSetupError(
            "trainer.output", f"the model names {len(labels)} labels but output {output.name!r} scores {classes} "
            f"classes{_other_outputs(service, output)}")
    if config.validation_metric == "accuracy" and classes == 1:
        raise TrainingSetupError("trainer.validation_metric", "accuracy needs at least two classes")


def _other_outputs(service: AdapterService, output: TensorSpec) -> str:
    others = [f"{o.name} {list(o.shape)}" for o in service.model_outputs if o.name != output.name]
    return f"; choose another with trainer.output: {', '.join(others)}" if others else ""


def _key_of(message: str) -> str:
    if "does not influence the loss output" in message:
        return "trainer.output"
    if "gradient rule" in message:
        return "trainer.backend"
    if "a_init 'principal' needs rank" in message:
        return "trainer.rank"
    if "backend trains no language model" in message:
        return "trainer.backend"
    return "model.targets"


def _check_gate(service: AdapterService, config: AdapterTrainingConfig, output: TensorSpec) -> None:
    """The gate scores model tensors through :meth:`AdapterService.run`: try it on one row."""
    if training_loss(service, config) == "causal_lm":
        _check_text_gate(service, config, output)
        return
    row = _placeholder_inputs(service.model_inputs, pad_length(service, config))
    try:
        outputs = service.run(row).outputs
    except Exception as e:  # ORT's own errors: the model cannot run a row of this shape
        raise TrainingSetupError("trainer.pad_length", f"the model cannot score a batch of shape "
                                 f"{ {k: list(v.shape) for k, v in row.items()} }: {e}") from e
    loss = training_loss(service, config)
    label = np.zeros((), np.int64) if loss == "cross_entropy" else np.zeros(outputs[output.name].shape[1:])
    scores = per_example_scores(outputs[output.name], [label], config.validation_metric, loss)
    if len(scores) != 1 or not np.isfinite(scores[0]):
        raise TrainingSetupError("trainer.output", f"output {output.name!r} gives {scores} as the score of one "
                                 "example; the validation gate needs one finite score per example")


def _check_text_gate(service: AdapterService, config: AdapterTrainingConfig, output: TensorSpec) -> None:
    """A language model's gate scores texts by windows: try one window of ``window_tokens``."""
    tokens = np.ones(config.window_tokens, np.int32)
    ids, mask, labels = windows_of(tokens, config.window_tokens)
    feeds = serving_feeds({"input_ids": ids, "attention_mask": mask}, service.model_inputs)
    try:
        logits = service.run(feeds).outputs[output.name]
    except Exception as e:  # ORT's own errors: e.g. more positions than the model has
        raise TrainingSetupError("trainer.window_tokens", f"the model cannot score a window of "
                                 f"{config.window_tokens} tokens: {e}") from e
    finally:
        service.engine.release_session()  # the decoder's on-demand session: a run opens it for its gate
    scores = lm_scores(logits, labels, np.zeros(1, np.int64), config.validation_metric)
    if len(scores) != 1 or not np.isfinite(scores[0]):
        raise TrainingSetupError("trainer.output", f"output {output.name!r} gives {scores} as the score of one "
                                 "text; the validation gate needs one finite score per text")


def _placeholder_inputs(specs: Sequence[Any], length: int) -> dict[str, np.ndarray]:
    """One row of the model's inputs: dynamic dimensions ``length`` long, integers 1 (a valid
    token id and a mask that keeps every position), floats 0."""
    row: dict[str, np.ndarray] = {}
    for s in specs:
        shape = [1, *(length if d < 0 else d for d in s.shape[1:])]
        row[s.name] = (np.ones(shape, s.numpy_dtype) if s.datatype.startswith(("INT", "UINT"))
                       else np.zeros(shape, s.numpy_dtype))
    return row
