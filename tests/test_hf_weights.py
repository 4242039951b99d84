"""The conversion mapping (megatron_training/hf_weights.py, epas/hf_config.py) in one process: Hugging Face LLaMA
and Llama 3 weights give transformers' logits in the megatron-core model and come back unchanged; the RoPE of the
converted model and of its export is transformers'; every error names the tensor or the setting.

tests/test_hf_conversion.py checks the conversion commands end to end at TP×PP layouts (several processes);
these check the mapping itself, so ``make mutation`` has a quick test for each of its lines.
"""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from epas.config import RunConfig
from epas.errors import ConfigError
from epas.hf_config import MEGATRON_LLAMA3_ROPE, hf_config_from_model, model_config_from_hf
from megatron_patches.model import build_model
from megatron_training.hf_files import HfWeights
from megatron_training.hf_weights import hf_to_megatron, megatron_to_hf
from tests.model_utils import relative_error

pytestmark = pytest.mark.usefixtures("megatron_cpu")

VOCAB = 200  # padded to 256 embedding rows
# Llama 3.1/3.2's RoPE: theta 500000, llama3 scaling (3.2's factor); the tiny heads still have high, medium and
# low frequencies against the 8192 original positions
LLAMA3 = dict(rope_theta=500000.0, max_position_embeddings=16384, rope_scaling={
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})


def _hf_llama(groups: int, tied: bool, rope: dict | None = None) -> LlamaForCausalLM:
    config = LlamaConfig(**{
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": groups, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied, **(rope or {}),
    })
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(groups)
    with torch.no_grad():  # every tensor distinct and O(1), norms away from 1: a swapped tensor shows
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.3 * noise if "norm" in name else 0.2 * noise)
    return model


@pytest.mark.parametrize("groups, tied, rope", [(4, False, None), (2, True, LLAMA3), (1, False, LLAMA3)],
                         ids=["mha-untied", "gqa-tied-llama3", "mqa-untied-llama3"])
def test_converted_weights_give_transformers_logits_and_convert_back_unchanged(groups, tied, rope):
    hf = _hf_llama(groups, tied, rope)
    model_config = model_config_from_hf(hf.config.to_dict())
    hf_state = dict(hf.state_dict())
    weights = dict(hf_to_megatron(hf_state, model_config))

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

    back = dict(megatron_to_hf(megatron.state_dict(), model_config))
    kept = {name: tensor for name, tensor in hf_state.items() if not (tied and name == "lm_head.weight")}
    assert back.keys() == kept.keys()
    for name, tensor in kept.items():
        assert torch.equal(back[name], tensor), name
        assert back[name].is_contiguous(), name


@pytest.mark.parametrize("rope", [None, LLAMA3], ids=["plain", "llama3"])
def test_rope_of_the_megatron_model_and_of_its_export_is_transformers(rope):
    """Frequency by frequency: Hugging Face's model, the converted megatron-core model, and the export's config."""
    from epas_hf import EpasLlamaConfig
    from epas_hf.modeling_epas_llama import EpasRotaryEmbedding

    hf = _hf_llama(2, False, rope)
    model_config = model_config_from_hf(hf.config.to_dict())
    megatron = build_model(RunConfig(model=model_config, device="cpu"))
    expected = hf.model.rotary_emb.inv_freq
    torch.testing.assert_close(megatron.rotary_pos_emb.inv_freq, expected, rtol=1e-6, atol=0)
    exported = EpasLlamaConfig(**hf_config_from_model(model_config, (), "qk", ()))
    torch.testing.assert_close(EpasRotaryEmbedding(exported).inverse_frequencies("cpu"), expected, rtol=1e-6, atol=0)
    assert model_config_from_hf(exported.to_dict()) == model_config  # the export converts back to the same model
    assert exported.max_position_embeddings == hf.config.max_position_embeddings
    if rope is not None:  # the scaling matters at these frequencies
        plain = build_model(RunConfig(model=model_config_from_hf(_hf_llama(2, False).config.to_dict()), device="cpu"))
        assert not torch.allclose(plain.rotary_pos_emb.inv_freq, megatron.rotary_pos_emb.inv_freq)


def test_llama3_settings_the_converter_assumes_are_megatron_cores():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    defaults = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    assert {key: defaults[key].default for key in MEGATRON_LLAMA3_ROPE} == MEGATRON_LLAMA3_ROPE


LLAMA3_SCALING = LLAMA3["rope_scaling"]


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "attention_bias=true; the megatron-core model here has no bias terms"),
    ({"mlp_bias": True}, "mlp_bias=true; the megatron-core model here has no bias terms"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'; the megatron-core model's MLP is SwiGLU"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling of type 'yarn'; the converter supports"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling of type 'dynamic'"),
    ({"rope_scaling": LLAMA3_SCALING | {"high_freq_factor": 2.0}}, "has high_freq_factor=2.0; megatron-core's"),
    ({"rope_scaling": LLAMA3_SCALING | {"low_freq_factor": 2.0}}, "has low_freq_factor=2.0"),
    ({"rope_scaling": LLAMA3_SCALING | {"original_max_position_embeddings": 4096}},
     "has original_max_position_embeddings=4096"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "has low_freq_factor=None"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5; the megatron-core model rotates whole heads"),
    ({"head_dim": 32}, "head_dim=32 ≠ hidden_size / num_attention_heads"),
], ids=["attention-bias", "mlp-bias", "gelu", "yarn", "dynamic", "llama3-high", "llama3-low", "llama3-original",
        "llama3-incomplete", "partial-rotary", "head-dim"])
def test_what_megatron_core_cannot_build_is_refused_by_name(change, message):
    config = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
              "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": VOCAB}
    with pytest.raises(ConfigError, match="config.json.*" + re.escape(message)):
        model_config_from_hf(config | change)


def test_llama3_configs_read_in_both_transformers_formats():
    """The Hub's Llama 3.2 config.json (rope_theta + rope_scaling, as transformers 4 writes) and transformers 5's
    rope_parameters give the same model; a long context trains at its 8192 original positions."""
    hub = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 16, "hidden_size": 2048,
           "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
           "max_position_embeddings": 131072, "tie_word_embeddings": True, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING}
    v5 = {key: value for key, value in hub.items() if key not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = LLAMA3_SCALING | {"rope_theta": 500000.0}
    model = model_config_from_hf(hub)
    assert model_config_from_hf(v5) == model
    assert (model.rope_scaling_factor, model.rotary_base, model.seq_length, model.max_position_embeddings) == (
        32.0, 500000.0, 8192, 131072)
    assert model.padded_vocab_size() == 128256 and model.query_groups == 8 and model.tie_embeddings


def test_mapping_errors_name_the_tensor():
    hf = _hf_llama(2, tied=False)
    model_config = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    assert dict(hf_to_megatron({**state, "model.rotary_emb.inv_freq": torch.ones(8)}, model_config))  # old checkpoints
    with pytest.raises(ConfigError, match=r"lack model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_to_megatron({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, model_config)
    with pytest.raises(ConfigError, match=r"lm_head\.weight has 199 rows but config.json's vocab_size is 200"):
        dict(hf_to_megatron({**state, "lm_head.weight": state["lm_head.weight"][:-1]}, model_config))
    with pytest.raises(ConfigError, match=r"model\.embed_tokens\.weight has 201 rows"):
        dict(hf_to_megatron({**state, "model.embed_tokens.weight": torch.zeros(201, 64)}, model_config))
    with pytest.raises(ConfigError, match=r"does not know: \['model\.layers\.0\.extra\.weight'\]"):
        hf_to_megatron({**state, "model.layers.0.extra.weight": torch.ones(1)}, model_config)
    assert state.keys() == dict(hf.state_dict()).keys()  # the caller's dict is left as it was


def test_tied_weights_convert_with_or_without_the_head_tensor():
    """save_pretrained leaves the tied lm_head.weight out of model.safetensors; some exports keep it."""
    hf = _hf_llama(2, tied=True)
    model_config = model_config_from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    with_head = dict(hf_to_megatron(state, model_config))
    without_head = dict(hf_to_megatron({k: v for k, v in state.items() if k != "lm_head.weight"}, model_config))
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
        read = HfWeights(folder)
        assert read.keys() == state.keys(), folder.name
        assert all(torch.equal(read[name], state[name]) for name in names), folder.name

    torch.save({"model.norm.weight": torch.ones(2), "hook": Exception("pickled code")}, pickled / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):  # a .bin is never unpickled freely
        HfWeights(pickled)

    (sharded / "model-00002-of-00002.safetensors").unlink()  # an incomplete download
    with pytest.raises(ConfigError, match="index.json lists model-00002-of-00002.safetensors, not in .*sharded"):
        HfWeights(sharded)
    with pytest.raises(ConfigError, match="no weights in .*: expected model.safetensors"):
        HfWeights(tmp_path)
