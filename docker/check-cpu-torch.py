"""Fail the image build when the installed torch is a CUDA build or any nvidia-* wheel came along."""

import importlib.metadata
import sys

import torch

names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
nvidia = sorted(n for n in names if n.lower().startswith("nvidia"))
if torch.version.cuda is not None or nvidia:
    found = ", ".join(nvidia) or "no nvidia wheels"
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) with {found}: the image must be CPU-only")
x = torch.randn(64, 64)
assert torch.allclose(x @ torch.eye(64), x), "torch cannot multiply matrices"
print(f"torch {torch.__version__}: CPU build, no CUDA libraries")
