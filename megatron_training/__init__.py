"""Pretraining on megatron-core with EPAS: the trainer, its checks, data, checkpoints, metrics, conversion.

megatron_patches is imported first: on a CPU machine it quiets megatron-core's import-time notices that
Transformer Engine and apex are absent (they are GPU-only here by design).
"""

import megatron_patches  # noqa: F401
