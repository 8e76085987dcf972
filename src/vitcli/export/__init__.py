"""`vit export`: write a trained classifier for the runtimes people ship with, each file verified there.

    report = export("runs/digits16", "onnx", "digits16.onnx")    # onnx | exported-program | hf | timm | vitcli
    report["max_abs_diff"]                                        # largest logit difference measured

Every format is checked by loading what was written with its own runtime (onnxruntime, torch.export.load,
transformers, timm, vitcli's reader) and comparing its logits with the PyTorch model's on a random batch.
Since `--ckpt` takes every format vitcli reads, this also converts between them.
"""

from vitcli.export.run import FORMATS, export

__all__ = ["FORMATS", "export"]
