"""One typed configuration for the whole recipe: YAML presets plus ``section.key=value`` overrides.

Every section is a dataclass; loading checks keys, types and choices (``Literal``), names the
closest valid key when one is misspelt, checks each number against the :class:`Bound` declared in its
type and runs each section's own ``validate()``, so a typo or a meaningless value fails at start-up
instead of silently using a default or crashing mid-run. The comment beside a field is its
documentation: :func:`describe` renders it (with the bound) for ``--help`` and ``docs/CONFIG.md``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from epas.errors import ConfigError
from epas.sharing import SharingMode

DecayStyle = Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"]


@dataclass(frozen=True)
class Bound:
    """Where a number must lie, declared in its type (``Annotated[int, Bound(1)]``): checked by
    :func:`validate_sections` on the final values and shown beside the type in docs/CONFIG.md."""

    low: float
    high: float | None = None
    low_open: bool = False  # the low end itself is refused
    high_open: bool = False  # the high end itself is refused

    def allows(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def phrase(self) -> str:
        """For error messages: "at least 1", "0 or more", "above 0", "in [0, 1)"."""
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low_open:
            return f"above {self.low}"
        return "0 or more" if self.low == 0 else f"at least {self.low}"

    def __str__(self) -> str:
        if self.high is not None:
            return self.phrase()
        return f"{'>' if self.low_open else '≥'} {self.low}"


Count = Annotated[int, Bound(1)]  # sizes, counts and intervals
CountOrZero = Annotated[int, Bound(0)]  # counts and step numbers where 0 means none or the start
Positive = Annotated[float, Bound(0, low_open=True)]
NonNegative = Annotated[float, Bound(0)]
Beta = Annotated[float, Bound(0, 1, high_open=True)]  # Adam's moment decay rates
Seed = Annotated[int, Bound(0, 2**32 - 1)]  # NumPy's seed range (megatron-core's dataset shuffles)


@dataclass
class ModelConfig:
    """A LLaMA-style decoder (RMSNorm, SwiGLU, RoPE, no biases)."""

    num_layers: Count = 4  # decoder layers
    hidden_size: Count = 128  # model width
    num_attention_heads: Count = 4  # query heads
    num_query_groups: Count | None = None  # None: multi-head attention (one group per head)
    ffn_hidden_size: Count = 344  # SwiGLU inner size
    vocab_size: Count = 32000  # the tokenizer's size (at least)
    make_vocab_size_divisible_by: Count = 128  # embedding rows are padded for tensor parallelism
    seq_length: Count = 256  # tokens per training sample (and RoPE positions)
    # the context the model is made for (Hugging Face's max_position_embeddings; null: seq_length); only the export
    # reads it: a model continued at a shorter seq_length keeps the context it was released with
    max_position_embeddings: Count | None = None
    norm_epsilon: Positive = 1e-5  # RMSNorm epsilon
    rotary_base: Positive = 10000.0  # RoPE theta
    # Llama 3.1/3.2 RoPE scaling (rope_type "llama3", megatron-core's rope_scaling) by this factor (Llama 3.1: 8,
    # 3.2: 32), with megatron-core's low/high frequency factors 1 and 4 and 8192 original positions; null: plain RoPE
    rope_scaling_factor: Annotated[float, Bound(1)] | None = None
    tie_embeddings: bool = False  # output layer shares the embedding weights
    init_method_std: Positive = 0.02  # normal init of the weights

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self) -> int:
        """Embedding rows: the vocabulary padded to ``make_vocab_size_divisible_by``.

        Unlike Megatron-LM the padding does not grow with TP, so every layout reads the same
        checkpoint; the trainer checks that TP divides it.
        """
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.query_groups}"
            )


@dataclass
class ParallelConfig:
    """How the model is split over the processes; data parallelism takes the rest of the world."""

    tensor_parallel: Count = 1  # TP: must divide heads, query groups and the padded vocabulary
    pipeline_parallel: Count = 1  # PP stages
    virtual_pipeline: Count | None = None  # model chunks per stage (interleaved 1F1B)
    sequence_parallel: bool = False  # split norms and dropout along the sequence over the TP ranks (needs TP > 1)
    # uneven pipelines: layers on the first / last stage (the rest are split evenly), e.g. to
    # balance the embedding and the output layer
    first_stage_layers: Count | None = None
    last_stage_layers: Count | None = None  # layers on the last stage (uneven pipelines)
    overlap_grad_reduce: bool = False  # reduce each gradient bucket over data parallelism while backward goes on
    # parameters per gradient bucket with overlap_grad_reduce (Megatron-LM's --ddp-bucket-size); null: megatron-core's
    # max(40M, 1M × data-parallel size)
    ddp_bucket_size: Count | None = None
    # with the distributed optimizer: gather each bucket's updated weights during the next forward
    overlap_param_gather: bool = False


@dataclass
class EPASConfig:
    """Which layers may share and how the sharing region grows (Algorithm 1 of the paper).

    The target set is either ``sharing_layers`` (explicit 0-based indices, as in Hugging Face)
    or ``num_sharing_layers`` deep layers split into ``num_blocks`` equal blocks, separated by
    ``block_gap`` compute layers, ending at the last layer (or just before it when
    ``include_last_layer`` is false).
    """

    mode: SharingMode = "qk"  # "qk": reuse Q and K, compute V; "kv": reuse K and V, compute Q
    num_sharing_layers: CountOrZero = 0  # target size, counted from the deep end (0: no sharing)
    sharing_layers: list[int] | None = None  # or the target as explicit 0-based layers
    num_blocks: Count = 1  # blocks the target is split into
    block_gap: Count = 1  # compute layers between two blocks
    include_last_layer: bool = True  # false: the deepest block ends one layer before the last
    interval: Count = 100  # I: steps between two growths
    growth: Count = 1  # B: layers added per growth
    start_step: CountOrZero = 0  # steps before the first growth is counted


@dataclass
class DataConfig:
    """Training data: a weighted blend of megatron-core indexed datasets, or synthetic tokens."""

    mock: bool = False  # synthetic random tokens, no files needed
    paths: list[str] | None = None  # dataset prefixes (PREFIX.bin / PREFIX.idx)
    weights: list[Positive] | None = None  # blend weights, one per path (default: by size)
    split: str = "969,30,1"  # train,valid,test proportions
    tokenizer: str | None = None  # Hugging Face tokenizer folder (EOD id, vocab check)
    micro_batch_size: Count = 4  # samples per forward pass
    global_batch_size: Count = 8  # samples per optimizer step (micro-batch × data parallel × accumulation)
    cache_dir: str | None = None  # where megatron-core caches dataset indices


@dataclass
class OptimizerConfig:
    """Adam with warm-up and decay of the learning rate."""

    lr: Positive = 3e-4  # peak learning rate
    min_lr: NonNegative = 3e-5  # where the decay ends (at most lr)
    warmup_steps: CountOrZero = 100  # linear warm-up from 0
    decay_style: DecayStyle = "cosine"  # decay after the warm-up
    weight_decay: NonNegative = 0.1  # decoupled (AdamW)
    adam_beta1: Beta = 0.9
    adam_beta2: Beta = 0.95
    adam_eps: Positive = 1e-8
    clip_grad: NonNegative = 1.0  # gradient-norm clipping (0: off)
    use_distributed_optimizer: bool = False  # shard optimizer states over data parallelism (ZeRO-1)
    # pretrain_epas.py on resume: take lr, min_lr, warmup_steps, decay_style, weight_decay, Adam betas, eps from this
    # config (and re-plan the decay over training.train_steps) instead of refusing changed values; finetune_epas.py
    # refuses it (a Trainer resume keeps the checkpoint's optimizer settings)
    override_on_resume: bool = False

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(
                f"optimizer.min_lr={self.min_lr} must not exceed optimizer.lr={self.lr}; the decay goes "
                "down from lr to min_lr (set them equal for a constant rate after the warm-up)"
            )


@dataclass
class TrainingConfig:
    """How long to train and when to log, evaluate and stop."""

    train_steps: Count = 300  # optimizer steps of the whole run
    log_interval: Count = 10  # steps per log line and TensorBoard point
    eval_interval: CountOrZero = 100  # steps between validations (0: none)
    eval_steps: Count = 5  # global batches per validation
    recompute: Literal["selective", "full"] | None = None  # null, "selective" (core attention) or "full"
    recompute_num_layers: Count = 1  # with recompute "full"
    exit_duration_minutes: Positive | None = None  # save and stop before a job time limit
    exit_interval: Count | None = None  # save and stop at the first iteration divisible by this
    peak_tflops: Positive | None = None  # per device, for MFU (e.g. 989 for H100 dense bf16)
    # a step whose loss or gradients are NaN/Inf is never applied nor saved: "stop" exits (the last
    # checkpoint stays the one to resume from), "skip" drops that step's update and goes on
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: Count = 10  # with on_nonfinite "skip": stop after this many skipped steps in a row


@dataclass
class CheckpointConfig:
    """Where the run saves and what it starts from."""

    dir: str | None = None  # where checkpoints are written (and resumed from)
    save_interval: Count | None = None  # steps between saves (null: only the last step, which is always saved)
    load: str | None = None  # start from this checkpoint folder instead (e.g. a converted HF model)
    load_optimizer: bool = True  # false: take only the weights (continual pretraining)
    # write in the background (megatron-core's async sharded save) while training goes on; `latest` moves to a
    # checkpoint only once every rank has finished writing it
    async_save: bool = False
    # keep the newest N checkpoints, deleting older ones once a newer one is published (null: keep all); never
    # the one this run resumed from, nor a folder holding a file named KEEP
    keep_last: Count | None = None


@dataclass
class LoggingConfig:
    """Where metrics go: the console always, TensorBoard and Weights & Biases when named (the same scalars)."""

    tensorboard_dir: str | None = None  # TensorBoard event files (null: console only)
    # Weights & Biases project (null: no W&B; needs `pip install wandb`); WANDB_MODE=offline works without network
    wandb_project: str | None = None
    wandb_entity: str | None = None  # W&B team or user (null: your default entity)
    wandb_run_name: str | None = None  # (null: W&B names the run)
    wandb_tags: list[str] | None = None  # labels to filter runs by in W&B
    wandb_dir: str | None = None  # where W&B writes its files (null: ./wandb)


@dataclass
class ProfilingConfig:
    """A profiler window over a few training steps: torch-profiler traces that TensorBoard and Perfetto open, or
    the capture range of Nsight Systems."""

    start_step: Count | None = None  # the first profiled iteration (null: no profiling)
    num_steps: Count = 3  # iterations in the window
    ranks: list[Annotated[int, Bound(0)]] = field(default_factory=lambda: [0])  # the ranks that profile
    # "torch": torch.profiler writes a trace; "nsys" (CUDA): the window is Nsight Systems' capture range
    # (cudaProfilerStart/Stop, with NVTX ranges), for a run under `nsys profile --capture-range=cudaProfilerApi`
    tool: Literal["torch", "nsys"] = "torch"
    record_shapes: bool = False  # operator input shapes in the trace (larger files)
    memory_snapshot: bool = False  # torch on CUDA: also a memory snapshot of the window (pytorch.org/memory_viz)
    dir: str | None = None  # where torch traces go (null: profile/ under logging.tensorboard_dir)


@dataclass
class DistributedConfig:
    """The process group."""

    # a collective that waits longer than this for another rank fails the run, naming the operation and the
    # rank that reports it (a hung or lost rank otherwise holds the job until the scheduler kills it)
    timeout_minutes: Positive = 10.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    epas: EPASConfig = field(default_factory=EPASConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    device: Literal["cpu", "cuda"] = "cpu"  # "cpu" switches on megatron_patches.cpu_bridge
    spec: Literal["local", "te"] = "local"  # "local" (megatron-core modules) or "te" (Transformer Engine, GPU)
    seed: Seed = 1234  # weights, data order and dropout


@dataclass
class FinetuneDataConfig:
    """Data for finetune_epas.py (the Hugging Face Trainer path).

    Formats: ``indexed`` (PREFIX.bin/.idx from tools/preprocess_data.py, read by megatron-core's
    GPTDataset as in pretraining), ``text`` (jsonl documents, tokenized and packed), ``chat`` (jsonl
    conversations rendered with the tokenizer's chat template, loss on assistant turns only) and
    ``instruction`` (jsonl prompt/response pairs, loss on the response only).
    """

    format: Literal["indexed", "text", "chat", "instruction"] = "indexed"  # see above
    paths: list[str] | None = None  # indexed: prefixes; others: jsonl files
    weights: list[Positive] | None = None  # indexed: blend weights, one per path
    split: str = "98,2,0"  # indexed: train,valid,test proportions
    valid_paths: list[str] | None = None  # text, chat, instruction: validation jsonl files
    tokenizer: str | None = None  # Hugging Face tokenizer folder (default: the model folder)
    text_key: str = "text"  # text: the JSON key of a document
    messages_key: str = "messages"  # chat: the JSON key of a conversation
    prompt_key: str = "prompt"  # instruction: the JSON key of the prompt
    response_key: str = "response"  # instruction: the JSON key of the response
    seq_length: Annotated[int, Bound(2)] = 512  # tokens per sample (longer conversations are truncated)
    micro_batch_size: Count = 4  # samples per device and forward pass
    global_batch_size: Count = 8  # samples per optimizer step (gradient accumulation fills the rest)
    cache_dir: str | None = None  # indexed: where megatron-core caches dataset indices


@dataclass
class FinetuneTrainingConfig:
    """How long the Trainer runs, when it logs, evaluates and saves, and with what engine."""

    train_steps: Count = 100  # optimizer steps of the whole run
    log_interval: Count = 10  # steps per log line and TensorBoard point
    eval_interval: Count | None = None  # steps between validations (null: none)
    eval_samples: Count = 64  # indexed: validation samples drawn from the split
    save_interval: Count | None = None  # steps between Trainer checkpoints (the last step is always saved)
    save_total_limit: Count | None = None  # keep only the newest N Trainer checkpoints
    exit_interval: Count | None = None  # save and stop at the first step divisible by this
    output_dir: str | None = None  # Trainer checkpoints (checkpoint-N) and the final EPAS folder (model/)
    deepspeed: str | None = None  # a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json
    bf16: bool = False  # bf16 mixed precision (GPU)
    gradient_checkpointing: bool = False  # recompute each layer in backward: less activation memory


@dataclass
class FinetuneConfig:
    """A run of finetune_epas.py: a Hugging Face model trained with the Trainer and the EPAS schedule."""

    model: str | None = None  # Hugging Face folder to start from: a plain LLaMA or an EPAS export
    epas: EPASConfig = field(default_factory=EPASConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: FinetuneTrainingConfig = field(default_factory=FinetuneTrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)  # iterations are optimizer steps
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: Seed = 1234  # weights of new layers, data order


_YAML11_FLOAT_MISS = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _suggest(name, options) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(value, hint, where: str):
    """Check ``value`` against a type hint, converting only where YAML/CLI lose type information."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _YAML11_FLOAT_MISS.fullmatch(value.strip()):
        return float(value)  # PyYAML reads 3e-4 (no dot) as a string
    if hint in (int, float, bool, str) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def from_dict(cls, data, where: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'{_suggest(key, names)}")
        values[key] = _coerce(value, hints[key], path)
    return cls(**values)


def apply_override(config, override: str) -> None:
    """Apply one ``section.key=value`` override (the value is parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    dotted, raw = override.split("=", 1)
    *parents, leaf = dotted.split(".")
    target, where = config, ""
    for part in parents:
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names or not dataclasses.is_dataclass(getattr(target, part)):
            raise ConfigError(f"unknown config section '{where}{part}'{_suggest(part, names)}")
        target, where = getattr(target, part), f"{where}{part}."
    names = [f.name for f in dataclasses.fields(target)]
    if leaf not in names:
        raise ConfigError(f"unknown config key '{dotted}'{_suggest(leaf, names)}")
    hint = typing.get_type_hints(type(target))[leaf]
    if dataclasses.is_dataclass(hint):
        raise ConfigError(f"override '{override}' would replace the whole '{dotted}' section; set its keys one "
                          f"by one, e.g. {dotted}.{dataclasses.fields(hint)[0].name}=...")
    setattr(target, leaf, _coerce(_parse_yaml(raw, f"override '{override}'"), hint, dotted))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, what: str):
    """Plain YAML data (safe loading: no tags that build objects; no key given twice); a problem names
    ``what`` and the line."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(error, yaml.constructor.ConstructorError) and "tag" in (error.problem or ""):
            tag = re.search(r"'tag:yaml\.org,2002:([^']*)'", error.problem)
            shown = f"!!{tag.group(1)}" if tag else error.problem.rsplit(" ", 1)[-1].strip("'")
            raise ConfigError(f"{what} uses the YAML tag '{shown}'{where}; tags are not allowed in a config, "
                              "write plain values") from None
        raise ConfigError(f"{what} is not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None
    except ValueError as error:  # a standard tag with a value it cannot convert, e.g. !!int five
        raise ConfigError(f"{what} is not valid YAML: {error}") from None


def _merge(base: dict, changes: dict) -> dict:
    """``base`` updated by ``changes``, section by section; a section given with no keys (``model:``
    with every line commented out) changes nothing rather than resetting the section to the defaults."""
    merged = dict(base)
    for key, value in changes.items():
        if value is None and isinstance(merged.get(key), dict):
            continue
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def _read_preset(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A preset's data; ``base: other.yaml`` (relative to the preset) is read first and updated."""
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; give a YAML file, e.g. configs/tiny_cpu.yaml")
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; presets live in configs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base'")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at "
                          f"offset {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"config file '{path}' cannot be read ({error.strerror})") from None
    data = _parse_yaml(text, f"config file '{path}'")
    if not isinstance(data, (dict, type(None))):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    data = dict(data or {})
    base = data.pop("base", None)
    if base is None and not data:
        raise ConfigError(f"config file '{path}' is empty; a preset sets some keys or names its 'base: other.yaml' "
                          "(an empty one would train the built-in defaults)")
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config file '{path}': base must be a preset file name such as tiny_cpu.yaml, "
                          f"got {base!r}")
    return _merge(_read_preset(path.parent / base, seen + (path.resolve(),)), data)


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=RunConfig):
    """Load a YAML preset (or the defaults when ``path`` is None) into ``schema``, apply overrides and
    run every section's ``validate()``."""
    data = _read_preset(Path(path)) if path is not None else {}
    config = from_dict(schema, data)
    for override in overrides:
        apply_override(config, override)
    validate_sections(config)
    return config


def validate_sections(config, where: str | None = None) -> None:
    """Each section's own checks (the ones that need no other section), deepest first: every number
    against the :class:`Bound` in its type (floats must be finite), then the section's ``validate()``.
    ``where`` is the section's key; by default the one it has in the schemas (``epas`` for EPASConfig)."""
    where = _SECTION_KEYS.get(type(config), "") if where is None else where
    hints = typing.get_type_hints(type(config), include_extras=True)
    for item in dataclasses.fields(config):
        value, key = getattr(config, item.name), f"{where}.{item.name}" if where else item.name
        if dataclasses.is_dataclass(value):
            validate_sections(value, key)
        else:
            _check_range(value, hints[item.name], key)
    if hasattr(config, "validate"):
        config.validate()


def _check_range(value, hint, where: str) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        _check_range(value, args[0], where)
        for bound in args[1:]:
            if isinstance(bound, Bound) and not bound.allows(value):
                raise ConfigError(f"{where} must be {bound.phrase()}, got {value!r}")
    elif origin in (typing.Union, types.UnionType) and value is not None:
        for option in args:
            if option is not type(None):
                _check_range(value, option, where)
    elif origin is list and value is not None:
        for index, item in enumerate(value):
            _check_range(item, args[0], f"{where}[{index}]")
    elif hint is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")


_SECTION_KEYS = {
    typing.get_type_hints(schema)[item.name]: item.name
    for schema in (RunConfig, FinetuneConfig)
    for item in dataclasses.fields(schema)
    if dataclasses.is_dataclass(typing.get_type_hints(schema)[item.name])
}


def load_for_entry_point(path, overrides, validate, schema=RunConfig):
    """An entry point's config: loaded, checked by ``validate(config, world_size)`` (which raises
    :class:`ConfigError`) and printed on rank 0."""
    config = load_config(path, overrides, schema)
    validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    if os.environ.get("RANK", "0") == "0":
        print(f"config {path}, resolved:\n{yaml.safe_dump(to_dict(config), sort_keys=False)}", flush=True)
    return config


def to_dict(config) -> dict:
    """The resolved configuration as plain data (printed at start, saved with checkpoints)."""
    return dataclasses.asdict(config)


# ---- documentation from the schema --------------------------------------------------------------


def field_docs(cls) -> dict[str, str]:
    """Each field's documentation: the comment on its line and the comment lines just above it."""
    docs, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        match = re.match(r"\s+(\w+): [^=]+=.*?(?:  # (.*))?$", line)
        if match and match.group(1) in {f.name for f in dataclasses.fields(cls)}:
            docs[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
        above = []
    return docs


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Annotated:
        inner, *marks = typing.get_args(hint)
        return " ".join([_type_name(inner), *(str(mark) for mark in marks if isinstance(mark, Bound))])
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(typing.get_args(hint)[0])}]"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def describe(schema=RunConfig) -> str:
    """Every key of ``schema`` as a Markdown table per section: type (or choices), default, meaning."""
    lines, top = [], []
    for item in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[item.name]
        if dataclasses.is_dataclass(hint):
            lines += ["", f"### `{item.name}`", "", *_section_table(hint, item.name)]
        else:
            top.append(item.name)
    if top:
        lines += ["", "### top level", "", *_section_table(schema, "", only=top)]
    return "\n".join(lines).lstrip("\n") + "\n"


def _section_table(cls, prefix: str, only=None) -> list[str]:
    hints, docs, default = typing.get_type_hints(cls, include_extras=True), field_docs(cls), cls()
    doc = inspect.cleandoc(cls.__doc__ or "") if prefix and not cls.__doc__.startswith(cls.__name__) else ""
    rows = [doc.split("\n\n")[0].replace("\n", " "), ""] if doc else []
    rows += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for item in dataclasses.fields(cls):
        if only is not None and item.name not in only:
            continue
        key = f"{prefix}.{item.name}" if prefix else item.name
        value = yaml.safe_dump(getattr(default, item.name), default_flow_style=True).strip().removesuffix("...").strip()
        type_name = _type_name(hints[item.name]).replace("|", "\\|")
        rows.append(f"| `{key}` | {type_name} | `{value}` | {docs.get(item.name, '')} |")
    return rows


def config_reference() -> str:
    """docs/CONFIG.md: every key of both entry points, generated from the schema (``python -m epas.config``)."""
    return (
        "# Configuration keys\n\n"
        "Generated from `epas/config.py` by `python -m epas.config > docs/CONFIG.md` (a test keeps it current).\n"
        "A preset (`configs/*.yaml`, optionally `base: other.yaml`) sets any of them; `section.key=value` on the\n"
        "command line overrides one (the value is read as YAML: `data.paths=[a,b]`, `training.recompute=null`).\n\n"
        "- A number's range is part of its type (`int ≥ 1`, `float > 0`, `float in [0, 1)`) and is checked on the\n"
        "  final values, after every override; every float must also be finite (`.nan`, `.inf` are refused).\n"
        "- A preset with nothing in it (empty, only comments, `{}`) is refused rather than training the defaults;\n"
        "  so is a key given twice in one section (YAML would keep the last one silently).\n"
        "- In a preset with a `base:`, a section is merged key by key into the base's; a section given with no\n"
        "  keys (`model:` with every line commented out) changes nothing\n"
        "  (a key given with no value, by contrast, is set to null).\n"
        "- Presets are plain YAML in UTF-8: tags (`!!python/...`, `!!int`, ...) are refused.\n\n"
        "## `pretrain_epas.py`\n\n" + describe(RunConfig) + "\n"
        "## `finetune_epas.py`\n\n" + describe(FinetuneConfig)
    )


if __name__ == "__main__":
    print(config_reference(), end="")
