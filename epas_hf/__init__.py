"""EPAS LLaMA as a self-contained Hugging Face transformers model.

Importing this package registers ``epas_llama`` with AutoConfig and AutoModelForCausalLM, for local use. Exported
checkpoints carry their own copy of the two model files (see `write_model_files`) and load anywhere with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``; where this package is installed,
``EpasLlamaForCausalLM.from_pretrained(folder)`` loads them without running any code from the folder, and
`foreign_code` tells whether a folder holds code other than this package's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_epas_llama import EpasLlamaConfig
from .modeling_epas_llama import (
    EpasCache,
    EpasStaticCache,
    EpasLlamaForCausalLM,
    EpasLlamaModel,
    EpasLlamaPreTrainedModel,
)

__all__ = [
    "EpasCache",
    "EpasStaticCache",
    "EpasLlamaConfig",
    "EpasLlamaForCausalLM",
    "EpasLlamaModel",
    "EpasLlamaPreTrainedModel",
    "foreign_code",
    "write_model_files",
]

MODEL_FILES = ("configuration_epas_llama.py", "modeling_epas_llama.py")
AUTO_MAP = {
    "AutoConfig": "configuration_epas_llama.EpasLlamaConfig",
    "AutoModel": "modeling_epas_llama.EpasLlamaModel",
    "AutoModelForCausalLM": "modeling_epas_llama.EpasLlamaForCausalLM",
}

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
    return dict(AUTO_MAP)


def foreign_code(folder) -> list[str]:
    """What ``from_pretrained(folder, trust_remote_code=True)`` could run beyond this package's own model code:
    each ``.py`` file of the folder that is not one of the installed model files byte for byte, and each
    ``auto_map`` entry of its config.json other than those `write_model_files` returns (another module, or code
    on the Hub). Empty for a folder exported with this version of the package, and for a plain LLaMA folder."""
    folder = Path(folder)
    own = {name: Path(__file__).with_name(name).read_bytes() for name in MODEL_FILES}
    foreign = [path.name for path in sorted(folder.glob("*.py")) if own.get(path.name) != path.read_bytes()]
    config_file = folder / "config.json"
    auto_map = {}
    if config_file.is_file():
        auto_map = json.loads(config_file.read_text()).get("auto_map") or {}
    foreign += [f"auto_map {key}={value}" for key, value in sorted(auto_map.items()) if AUTO_MAP.get(key) != value]
    return foreign
