"""EPAS (Efficient training with Progressive Activation Sharing) on Megatron-core."""

import warnings

import torch

if not torch.cuda.is_available():
    # On a CPU install megatron-core announces at import that Transformer Engine and Apex are
    # absent; they are GPU-only by design here, so the notices carry no information.
    warnings.filterwarnings("ignore", message=r"(Transformer Engine|Apex) (and Apex )?(is|are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated")
