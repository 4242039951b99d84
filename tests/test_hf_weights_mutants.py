"""The conversion mapping (megatron_training/hf_weights.py) in one process: Hugging Face LLaMA weights give
transformers' logits in the megatron-core model and come back unchanged; every error names the tensor.

tests/test_hf_conversion.py checks the conversion commands end to end at TP×PP layouts (several processes);
these check the mapping itself, so ``make mutation`` has a quick test for each of its lines.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from epas.config import RunConfig
from epas.errors import ConfigError
from epas.hf_config import model_config_from_hf
from megatron_patches.model import build_model
from megatron_training.hf_weights import hf_to_megatron, megatron_to_hf, read_hf_state_dict
from tests.model_utils import relative_error

pytestmark = pytest.mark.usefixtures("megatron_cpu")

VOCAB = 200  # padded to 256 embedding rows


def _hf_llama(groups: int, tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=groups, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(groups)
    with torch.no_grad():  # every tensor distinct and O(1), norms away from 1: a swapped tensor shows
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
    return model


@pytest.mark.parametrize("groups, tied", [(4, False), (2, True), (1, False)], ids=["mha-untied", "gqa-tied", "mqa"])
def test_converted_weights_give_transformers_logits_and_convert_back_unchanged(groups, tied):
    hf = _hf_llama(groups, tied)
    model_config = model_config_from_hf(hf.config.to_dict())
    hf_state = dict(hf.state_dict())
    weights = hf_to_megatron(hf_state, model_config)

    megatron = build_model(RunConfig(model=model_config, device="cpu"))
    state = megatron.state_dict()
    assert set(weights) == {name for name in state if not name.endswith("_extra_state")}
    with torch.no_grad():
        for name, tensor in weights.items():
            state[name].copy_(tensor)
    assert not weights["embedding.word_embeddings.weight"][VOCAB:].any()  # padding rows are zeros

    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        logits = megatron(tokens, torch.arange(12).expand_as(tokens), None)[..., :VOCAB]
    assert relative_error(logits, expected) < 1e-5

    back = megatron_to_hf(megatron.state_dict(), model_config)
    kept = {name: tensor for name, tensor in hf_state.items() if not (tied and name == "lm_head.weight")}
    assert back.keys() == kept.keys()
    for name, tensor in kept.items():
        assert torch.equal(back[name], tensor), name
        assert back[name].is_contiguous(), name


def test_mapping_errors_name_the_tensor():
    hf = _hf_llama(2, tied=False)
    model_config = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    assert hf_to_megatron({**state, "model.rotary_emb.inv_freq": torch.ones(8)}, model_config)  # old checkpoints
    with pytest.raises(ConfigError, match=r"lack model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_to_megatron({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, model_config)
    with pytest.raises(ConfigError, match=r"lm_head\.weight has 199 rows but config.json's vocab_size is 200"):
        hf_to_megatron({**state, "lm_head.weight": state["lm_head.weight"][:-1]}, model_config)
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight has 201 rows"):
        hf_to_megatron({**state, "model.embed_tokens.weight": torch.zeros(201, 64)}, model_config)
    with pytest.raises(ConfigError, match=r"does not know: \['model\.layers\.0\.extra\.weight'\]"):
        hf_to_megatron({**state, "model.layers.0.extra.weight": torch.ones(1)}, model_config)
    assert state.keys() == dict(hf.state_dict()).keys()  # the caller's dict is left as it was


def test_tied_weights_convert_with_or_without_the_head_tensor():
    """save_pretrained leaves the tied lm_head.weight out of model.safetensors; some exports keep it."""
    hf = _hf_llama(2, tied=True)
    model_config = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    with_head = hf_to_megatron(state, model_config)
    without_head = hf_to_megatron({k: v for k, v in state.items() if k != "lm_head.weight"}, model_config)
    assert with_head.keys() == without_head.keys() and "output_layer.weight" not in with_head


def test_weights_are_read_from_every_hugging_face_layout(tmp_path):
    state = {name: tensor.contiguous() for name, tensor in _hf_llama(2, tied=False).state_dict().items()}
    names = sorted(state)
    first, second = names[: len(names) // 2], names[len(names) // 2:]

    single = tmp_path / "single"
    single.mkdir()
    save_file(state, str(single / "model.safetensors"))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for part, file in ((first, "model-00001-of-00002.safetensors"), (second, "model-00002-of-00002.safetensors")):
        save_file({name: state[name] for name in part}, str(sharded / file))
    weight_map = {name: f"model-0000{1 + (name in second)}-of-00002.safetensors" for name in names}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pickled = tmp_path / "bin"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    pickled_sharded = tmp_path / "bin_sharded"
    pickled_sharded.mkdir()
    for part, file in ((first, "pytorch_model-00001-of-00002.bin"), (second, "pytorch_model-00002-of-00002.bin")):
        torch.save({name: state[name] for name in part}, pickled_sharded / file)
    bin_map = {name: f"pytorch_model-0000{1 + (name in second)}-of-00002.bin" for name in names}
    (pickled_sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": bin_map}))

    for folder in (single, sharded, pickled, pickled_sharded):
        read = read_hf_state_dict(folder)
        assert read.keys() == state.keys(), folder.name
        assert all(torch.equal(read[name], state[name]) for name in names), folder.name

    torch.save({"model.norm.weight": torch.ones(2), "hook": Exception("pickled code")}, pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):  # a .bin is never unpickled freely
        read_hf_state_dict(pickled)

    (sharded / "model-00002-of-00002.safetensors").unlink()  # an incomplete download
    with pytest.raises(ConfigError, match="no weights in .*sharded: expected model.safetensors"):
        read_hf_state_dict(sharded)
