"""EPAS LLaMA as a self-contained Hugging Face transformers model.

Importing this package registers ``epas_llama`` with AutoConfig and AutoModelForCausalLM, for local use. Exported
checkpoints carry their own copy of the two model files (see `write_model_files`) and load anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_epas_llama import EpasLlamaConfig
from .modeling_epas_llama import (
    EpasCache,
    EpasLlamaForCausalLM,
    EpasLlamaModel,
    EpasLlamaPreTrainedModel,
)

__all__ = [
    "EpasCache",
    "EpasLlamaConfig",
    "EpasLlamaForCausalLM",
    "EpasLlamaModel",
    "EpasLlamaPreTrainedModel",
    "write_model_files",
]

MODEL_FILES = ("configuration_epas_llama.py", "modeling_epas_llama.py")

AutoConfig.register(EpasLlamaConfig.model_type, EpasLlamaConfig, exist_ok=True)
AutoModel.register(EpasLlamaConfig, EpasLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(EpasLlamaConfig, EpasLlamaForCausalLM, exist_ok=True)


def write_model_files(folder) -> dict[str, str]:
    """Copy the two model files into an export folder; return the ``auto_map`` to put in its config.json.

    With both, ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` needs nothing but
    torch and transformers.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(Path(__file__).with_name(name), folder / name)
    return {
        "AutoConfig": "configuration_epas_llama.EpasLlamaConfig",
        "AutoModel": "modeling_epas_llama.EpasLlamaModel",
        "AutoModelForCausalLM": "modeling_epas_llama.EpasLlamaForCausalLM",
    }
