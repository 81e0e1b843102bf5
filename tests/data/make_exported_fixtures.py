"""Make the exported-model fixtures under ``tests/data/exported/`` with the real tools.

Run in a virtualenv with torch, onnxscript, peft (and, for the BERT fixture, Optimum)::

    /work/tv/bin/python tests/data/make_exported_fixtures.py          # torch, dynamo, PEFT
    OV/bin/python tests/data/make_exported_fixtures.py                 # + the Optimum BERT

where ``OV`` is a virtualenv layered on the torch one (a ``.pth`` file naming its
site-packages) with ``optimum-onnx==0.1.0 transformers==4.57.6 tokenizers==0.22.1
huggingface_hub==0.36.2 requests`` (Optimum's ONNX exporter does not run on
transformers 5). The versions used are written to ``exported/VERSIONS.txt``.

Nothing here is shaped for lorad: a small torch encoder (2 layers, d=32; attention with
q_proj/k_proj/v_proj/out_proj, FFN up/down, LayerNorm, GELU, an int64 attention mask,
token embeddings, a Linear classification head) is exported as users export it:

* ``encoder_torchscript_17.onnx``  TorchScript exporter, opset 17, constant folding (the
  default): anonymous ``onnx::MatMul_N`` weights, decomposed GELU (Erf);
* ``encoder_torchscript_20.onnx``  TorchScript exporter, opset 20, ``do_constant_folding=False``:
  named weights behind ``Transpose`` nodes, fused ``Gelu``;
* ``encoder_dynamo_17.onnx`` / ``encoder_dynamo_20.onnx``  the dynamo exporter
  (``val_N`` weights, module paths only in ``pkg.torch.onnx.name_scopes`` metadata);
* ``conv1d_torchscript_17.onnx``  a GPT-2-style block whose linears are transformers'
  ``Conv1D`` (weights stored ``[in, out]``; PEFT needs ``fan_in_fan_out``);
* ``bert_optimum_17.onnx``  a tiny random BertForSequenceClassification exported by Optimum.

PEFT adapters (``r=4, lora_alpha=8``, random A and B so that they change the outputs) are
saved by ``peft`` itself, and ``reference.npz`` holds the inputs and the torch outputs of
the base model and of every PEFT model. With ``--lorad`` (run from the repository root
after lorad's files exist) the script also loads, with lorad, a PEFT adapter, writes it
back the way lorad writes files (trainer output, OTA installs, exports), loads that
directory with ``peft.PeftModel.from_pretrained`` and records torch's outputs for it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "exported"
VOCAB, D, HEADS, FFN, LAYERS, CLASSES, SEQ = 64, 32, 2, 64, 2, 4, 8
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": False}


class Attention(nn.Module):
    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        self.conv1d = conv1d
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.c_attn = Conv1D(3 * D, D)
            self.c_proj = Conv1D(D, D)
        else:
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.conv1d:
            q, k, v = self.c_attn(x).split(D, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (y.view(b, t, HEADS, D // HEADS).transpose(1, 2) for y in (q, k, v))
        scores = q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5 + (1.0 - mask[:, None, None, :]) * -1e4
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        return self.c_proj(out) if self.conv1d else self.out_proj(out)


class Layer(nn.Module):
    def __init__(self, conv1d: bool) -> None:
        super().__init__()
        self.attn = Attention(conv1d)
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.up, self.down, self.act = nn.Linear(D, FFN), nn.Linear(FFN, D), nn.GELU()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask))
        return self.norm2(x + self.down(self.act(self.up(x))))


class Encoder(nn.Module):
    """Token embeddings, post-LN transformer layers, masked mean pooling, a linear head."""

    def __init__(self, conv1d: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Layer(conv1d) for _ in range(LAYERS))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        mask = attention_mask.to(x.dtype)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def _inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=g)
    mask = torch.ones(3, SEQ, dtype=torch.int64)
    mask[1, 5:] = 0  # padded rows: the mask matters
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _export_torchscript(model: nn.Module, path: Path, opset: int, *, fold: bool) -> None:
    names = ["input_ids", "attention_mask"]
    dyn = {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}}
    example = tuple(_inputs(0).values())
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=opset, input_names=names,
                      output_names=["logits"], dynamic_axes=dyn, do_constant_folding=fold)


def _export_dynamo(model: nn.Module, path: Path, opset: int) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in ("input_ids", "attention_mask")}
    program = torch.onnx.export(model, tuple(_inputs(0).values()), dynamo=True, opset_version=opset,
                                input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                dynamic_shapes=shapes)
    assert program is not None
    program.save(str(path))


def _peft(model: nn.Module, directory: Path, seed: int, **config: object) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**LORA, **config)).eval()  # type: ignore[arg-type]
    peft_model.save_pretrained(str(directory))
    (directory / "README.md").unlink(missing_ok=True)  # the model card; not part of the adapter
    return peft_model


def _run(model: nn.Module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.detach().numpy().astype(np.float32)


def make_encoders(ref: dict[str, np.ndarray]) -> None:
    torch.manual_seed(0)
    encoder = Encoder().eval()
    _export_torchscript(encoder, OUT / "encoder_torchscript_17.onnx", 17, fold=True)
    _export_torchscript(encoder, OUT / "encoder_torchscript_20.onnx", 20, fold=False)
    for opset in (17, 20):
        _export_dynamo(encoder, OUT / f"encoder_dynamo_{opset}.onnx", opset)
    inputs = _inputs(1)
    ref |= {f"encoder.{k}": v.numpy() for k, v in inputs.items()}
    ref["encoder.base"] = _run(encoder, inputs)
    qvu = _peft(encoder, OUT / "peft_encoder_qvu", 1, target_modules=["q_proj", "v_proj", "up"])
    ref["encoder.peft_encoder_qvu"] = _run(qvu, inputs)
    head = _peft(encoder, OUT / "peft_encoder_head", 2, target_modules=["q_proj", "v_proj", "up", "head"])
    ref["encoder.peft_encoder_head"] = _run(head, inputs)

    torch.manual_seed(3)
    gpt_style = Encoder(conv1d=True).eval()
    _export_torchscript(gpt_style, OUT / "conv1d_torchscript_17.onnx", 17, fold=True)
    ref["conv1d.base"] = _run(gpt_style, inputs)
    conv = _peft(gpt_style, OUT / "peft_conv1d", 4, target_modules=["c_attn"], fan_in_fan_out=True)
    ref["conv1d.peft_conv1d"] = _run(conv, inputs)


def make_bert(ref: dict[str, np.ndarray], work: Path) -> bool:
    try:
        from optimum.exporters.onnx import main_export
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError as e:
        print(f"skipping the Optimum BERT fixture: {e}", file=sys.stderr)
        return False
    torch.manual_seed(5)
    config = BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=FFN, max_position_embeddings=32, num_labels=3)
    bert = BertForSequenceClassification(config).eval()
    bert.save_pretrained(str(work / "bert"))
    main_export(str(work / "bert"), output=str(work / "bert_onnx"), task="text-classification", opset=17,
                do_validation=False)
    shutil.copy(work / "bert_onnx" / "model.onnx", OUT / "bert_optimum_17.onnx")
    inputs = _inputs(1) | {"token_type_ids": torch.zeros(3, SEQ, dtype=torch.int64)}
    ref |= {f"bert.{k}": v.numpy() for k, v in inputs.items()}
    ref["bert.base"] = _run(bert, inputs)
    peft_bert = _peft(bert, OUT / "peft_bert", 6, target_modules=["query", "value", "classifier"])
    ref["bert.peft_bert"] = _run(peft_bert, inputs)
    return True


def lorad_round_trip(ref: dict[str, np.ndarray]) -> None:
    """PEFT files -> lorad -> the files lorad writes -> peft.PeftModel.from_pretrained."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import onnx
    from peft import PeftModel

    from lorad.adapters.module_paths import ModulePaths
    from lorad.adapters.peft_format import dump_peft, load_peft, read_peft_dir

    torch.manual_seed(0)
    encoder = Encoder().eval()
    paths = ModulePaths.from_model(onnx.load(str(OUT / "encoder_torchscript_17.onnx")))
    adapter = load_peft(read_peft_dir(OUT / "peft_encoder_head"), weight_of=paths.weight_of)
    written = OUT / "lorad_written_head"
    written.mkdir(exist_ok=True)
    for name, data in dump_peft(adapter, module_of=paths.module_of).items():
        (written / name).write_bytes(data)
    model = PeftModel.from_pretrained(encoder, str(written)).eval()
    ref["encoder.lorad_written_head"] = _run(model, _inputs(1))
    assert np.allclose(ref["encoder.lorad_written_head"], ref["encoder.peft_encoder_head"], atol=1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lorad", action="store_true", help="also write and check lorad's own adapter files")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    OUT.mkdir(exist_ok=True)
    ref_path = OUT / "reference.npz"
    ref: dict[str, np.ndarray] = dict(np.load(ref_path)) if ref_path.exists() else {}
    if args.lorad:
        lorad_round_trip(ref)
    else:
        make_encoders(ref)
        work = Path(sys.prefix) / "tmp-fixtures"
        make_bert(ref, work)
        shutil.rmtree(work, ignore_errors=True)
        pins = ["torch", "onnx", "onnxscript", "peft", "transformers", "optimum", "optimum-onnx", "numpy", "safetensors"]
        lines = []
        for pin in pins:
            try:
                lines.append(f"{pin}=={md.version(pin)}")
            except md.PackageNotFoundError:
                continue
        (OUT / "VERSIONS.txt").write_text("\n".join([f"python=={sys.version.split()[0]}", *lines]) + "\n")
    np.savez(ref_path, **ref)


if __name__ == "__main__":
    main()
