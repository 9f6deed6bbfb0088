"""Training configuration: a YAML file plus ``--set key=value`` overrides, validated before any work.

Every knob of the seed's ``run_mcore_moonlight.sh`` has a key here; docs/training.md maps them one by one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moonforge.config import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
OPTIMIZERS = ("adamw", "muon")
ATTENTION_BACKENDS = ("sdpa", "flex", "varlen")
AC_MODES = ("none", "sel", "full", "offload")
EP_DISPATCHERS = ("alltoall", "allgather")
DATA_TYPES = ("idxmap", "raw")
DECAY_STYLES = ("cosine", "linear", "constant")


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    pp0_layers: int | None = None          # the seed's MP_PP0_LAYERS
    vp_layers: int | None = None           # the seed's MP_VP (layers per virtual pipeline stage)
    data_parallel: str = "fsdp"            # fsdp (the seed's DO=true) | replicate (DO=false)
    reshard_after_forward: bool = True
    ep_dispatcher: str = "alltoall"        # alltoall | allgather (less traffic while EP < top-k; more memory)
    # EP: keep the bf16 copies of the expert weights for the whole step (one cast per step); false casts them per
    # use, forward and backward: 14 GB less per GPU at Moonlight EP 2, for a few % more time
    cache_expert_casts: bool = True
    # FSDP: one gradient reduction per step, weights kept gathered in between; default: on with pp 1 and no
    # optimizer offload
    defer_grad_sync: bool | None = None


@dataclass
class DataConfig:
    type: str = "idxmap"                   # idxmap | raw (the seed's MP_DATASET_TYPE)
    train: list = field(default_factory=list)   # idxmap prefixes, optionally [[weight, prefix], ...]; raw: JSON files
    valid: list = field(default_factory=list)   # raw: a JSON file; idxmap: ignored (valid comes from `split`)
    split: str = "99,1,0"
    document_mask: bool = False            # pretraining: restart positions and mask attention at document ends
    cache_dir: str | None = None
    tokenizer: str | None = None           # defaults to init_from (which holds the tokenizer files)


@dataclass
class MuonConfig:
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    router_optimizer: str = "muon"         # muon | adamw
    distributed_mode: str = "spread"       # spread | replicated
    ns_dtype: str = "bf16"                 # Newton-Schulz precision: bf16 (the paper) | fp32


@dataclass
class TrainConfig:
    model: str = "tiny"                    # preset (tiny | moonlight-16b-a3b) or a directory with config.json
    init_from: str | None = None           # HF directory or moonforge checkpoint (the seed's PRETRAIN_CHECKPOINT_PATH)
    output_dir: str = "runs/moonforge"     # the seed's OUTPUT_BASEPATH
    sft: bool = False
    seq_len: int = 1024
    pad_len: int | None = None             # raw SFT: pad/truncate to this (defaults to seq_len)
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int | None = None
    train_tokens: int | None = None        # pretraining: iterations = tokens / (GBS x seq_len), as the seed
    warmup_iters: int | None = None
    warmup_tokens: int | None = None
    lr: float = 1e-5
    min_lr: float = 1e-6
    lr_decay_style: str = "cosine"
    lr_decay_iters: int | None = None      # default: train iters (pretrain) or train - warmup (SFT), as the seed
    optimizer: str = "adamw"
    weight_decay: float = 0.1
    norm_weight_decay: bool | None = None  # decay RMSNorm gammas too; default: no for adamw, yes for muon (paper)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    optimizer_state_dtype: str = "fp32"    # fp32 | bf16 Adam moments (Megatron's precision-aware optimizer)
    clip_grad: float = 1.0
    muon: MuonConfig = field(default_factory=MuonConfig)
    precision: str = "bf16"
    fp8_cache_weights: bool = False        # fp8: quantise weights once per step, not per use (see docs)
    attention_backend: str = "sdpa"
    activation_checkpointing: str = "none"
    ac_layers: int | None = None           # the seed's MP_AC_LAYERS: blocks per stage to recompute/offload
    optimizer_offload: float = 0.0         # fraction of the optimizer state kept in host memory (see docs)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    save_interval: int | None = None
    save_final: bool = True                # save when training ends (benchmarks turn it off)
    keep_last: int | None = 3
    async_save: bool = False
    eval_interval: int | None = None
    eval_iters: int = 10
    log_interval: int = 1
    seed: int = 1234
    router_fp32: bool = True
    expert_bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    max_skipped_steps: int = 10            # non-finite steps in a row before the run stops
    loss_scale: float | None = None        # fp16: None = dynamic loss scaling from 2**16
    compile: bool = False                  # fuse the element-wise kernels with torch.compile (GPU)
    compile_blocks: bool = False           # torch.compile every decoder block whole (implies compile)
    tensorboard: bool = True
    resume: bool = True                    # continue from output_dir/checkpoint's latest if present

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set lr=3e-4 or --set parallel.ep=2)")
            _assign(data, key.strip(), yaml.safe_load(value))
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        return _build(cls, data, source, "").validate(source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived values
    def iterations(self) -> tuple[int, int, int]:
        """(train iterations, warmup iterations, LR decay iterations) with the seed's conversions."""
        tokens_per_iter = self.global_batch_size * self.seq_len
        train = self.train_iters if self.train_iters is not None else self.train_tokens // tokens_per_iter
        if self.warmup_iters is not None:
            warmup = self.warmup_iters
        elif self.warmup_tokens is not None:
            warmup = self.warmup_tokens // tokens_per_iter
        else:
            warmup = 0
        decay = self.lr_decay_iters if self.lr_decay_iters is not None else (train - warmup if self.sft else train)
        return train, warmup, decay

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> "TrainConfig":
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: '{key}' {msg}")

        _choice(self.precision, PRECISIONS, "precision", fail)
        _choice(self.optimizer, OPTIMIZERS, "optimizer", fail)
        _choice(self.attention_backend, ATTENTION_BACKENDS, "attention_backend", fail)
        _choice(self.activation_checkpointing, AC_MODES, "activation_checkpointing", fail)
        _choice(self.data.type, DATA_TYPES, "data.type", fail)
        _choice(self.lr_decay_style, DECAY_STYLES, "lr_decay_style", fail)
        _choice(self.parallel.data_parallel, ("fsdp", "replicate"), "parallel.data_parallel", fail)
        _choice(self.parallel.ep_dispatcher, EP_DISPATCHERS, "parallel.ep_dispatcher", fail)
        _choice(self.optimizer_state_dtype, ("fp32", "bf16"), "optimizer_state_dtype", fail)
        _choice(self.muon.router_optimizer, OPTIMIZERS, "muon.router_optimizer", fail)
        _choice(self.muon.ns_dtype, ("bf16", "fp32"), "muon.ns_dtype", fail)
        if self.compile_blocks and self.activation_checkpointing == "sel":
            fail("compile_blocks", "does not combine with activation_checkpointing: sel (selective recomputation "
                 "runs each block under a dispatch mode, and compiled blocks then fall back to eager for good); use "
                 "activation_checkpointing: full or none, or compile_blocks: false")
        if self.compile_blocks and self.precision not in ("bf16", "fp8"):
            fail("compile_blocks", f"needs bf16 compute (precision bf16 or fp8), got precision {self.precision!r}: "
                 "the compiled grouped GEMM of the experts takes bf16 only; set compile_blocks: false or "
                 "precision: bf16")
        if self.precision == "fp8" and self.parallel.tp > 1:
            fail("precision", "fp8 takes whole weights: it does not combine with tensor parallelism "
                 f"(parallel.tp {self.parallel.tp}); use expert parallelism and FSDP (tp 1), or precision: bf16")
        for key in ("seq_len", "micro_batch_size", "global_batch_size", "log_interval", "eval_iters"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.global_batch_size % self.micro_batch_size:
            fail("global_batch_size", f"({self.global_batch_size}) must be a multiple of micro_batch_size "
                 f"({self.micro_batch_size}) x data-parallel size")
        if (self.train_iters is None) == (self.train_tokens is None):
            fail("train_iters", "or 'train_tokens': give exactly one (the seed's TRAIN_TOKENS_OR_ITERS)")
        if self.warmup_iters is not None and self.warmup_tokens is not None:
            fail("warmup_iters", "and 'warmup_tokens' are both set; give one")
        if self.sft and self.train_tokens is not None:
            fail("train_tokens", "is for pretraining; SFT counts iterations (train_iters, warmup_iters) as the seed")
        train, warmup, decay = self.iterations()
        if train < 1:
            fail("train_tokens", f"gives {train} iterations at GBS {self.global_batch_size} x seq {self.seq_len}")
        if warmup > train:
            fail("warmup_iters", f"({warmup}) exceeds the training iterations ({train})")
        if warmup and self.lr_decay_style != "constant" and warmup >= decay:
            fail("warmup_iters", f"({warmup}) must be less than the LR decay iterations ({decay}"
                 f"{', train - warmup for SFT' if self.sft and self.lr_decay_iters is None else ''}), as Megatron "
                 "requires")
        if not 0 <= self.min_lr <= self.lr:
            fail("min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        if not 0.0 <= self.optimizer_offload <= 1.0:
            fail("optimizer_offload", f"is a fraction in [0, 1] (the seed's OPTIMIZER_OFFLOAD), got "
                 f"{self.optimizer_offload}")
        if self.ac_layers is not None and self.ac_layers < 1:
            fail("ac_layers", f"must be >= 1, got {self.ac_layers}")
        if self.pad_len is not None and self.pad_len < 1:
            fail("pad_len", f"must be >= 1, got {self.pad_len}")
        if self.data.type == "raw" and not self.sft:
            fail("data.type", "raw (JSON) data is for SFT only (set sft: true), as in the seed")
        if not self.data.train:
            fail("data.train", "is empty: give idxmap prefixes (or weighted [weight, prefix] pairs) or a JSON file")
        if self.save_interval is not None and self.save_interval < 1:
            fail("save_interval", f"must be >= 1, got {self.save_interval}")
        if self.clip_grad < 0 or not math.isfinite(self.clip_grad):
            fail("clip_grad", f"must be a finite number >= 0, got {self.clip_grad}")
        return self


def _choice(value, options, key, fail) -> None:
    if value not in options:
        fail(key, f"is {value!r}; choose one of {', '.join(options)}")


def _assign(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[keys[-1]] = value


def _build(cls, data: dict, source: str, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = [n for n in fields if n.startswith(key[:3])]
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
        f = fields[key]
        sub = {"parallel": ParallelConfig, "data": DataConfig, "muon": MuonConfig}.get(key) if cls is TrainConfig \
            else None
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{prefix}{key}' must be a mapping")
            value = _build(sub, value, source, f"{prefix}{key}.")
        else:
            value = _coerce(value, f, f"{prefix}{key}", source)
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value, f: dataclasses.Field, key: str, source: str):
    """Check scalar types (YAML reads 1e-5 as a string; accept numbers written either way)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{source}: '{key}' cannot be null")
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if kind.startswith("int"):
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                return int(float(value)) if float(value).is_integer() else int(value)
            return int(value) if isinstance(value, int) else _raise()
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: '{key}' has the wrong type: {value!r} (expected {kind})") from None
    return value


def _raise():
    raise TypeError
