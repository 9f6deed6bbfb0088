"""Parallel layout: the sizes of each kind of parallelism, their validation, and the pipeline layer split.

Vocabulary is Megatron's: TP (tensor), SP (sequence, with TP), PP (pipeline; VP virtual stages; an uneven first
stage via ``pp0_layers``), CP (context), EP (expert), ETP (expert tensor), DP (data). The attention side of
the non-pipeline ranks is laid out as DP x CP x TP; the MoE side of the same ranks as EDP x EP x ETP.
"""

from __future__ import annotations

from dataclasses import dataclass

from moonforge.config import ConfigError, ModelConfig


@dataclass
class ParallelDims:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    sp: bool = False
    pp0_layers: int | None = None
    vp_layers: int | None = None  # layers per virtual stage (Megatron's --num-layers-per-virtual-pipeline-stage)

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1,
                  sp: bool = False, pp0_layers: int | None = None, vp_layers: int | None = None) -> "ParallelDims":
        """Data parallel takes whatever the other dimensions leave of ``world_size``."""
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep), ("etp", etp)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel layout: {name} must be a positive integer, got {value!r}")
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel layout: world size {world_size} is not divisible by TP x PP x CP = {tp} x {pp} x {cp} = "
                f"{model_parallel}; use a number of processes that is a multiple of {model_parallel}")
        return cls(tp=tp, pp=pp, cp=cp, ep=ep, etp=etp, dp=world_size // model_parallel, sp=sp and tp > 1,
                   pp0_layers=pp0_layers, vp_layers=vp_layers)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (the non-pipeline world): DP x CP x TP = EDP x EP x ETP."""
        return self.dp * self.cp * self.tp

    @property
    def edp(self) -> int:
        return self.stage_size // (self.ep * self.etp)

    def validate(self, config: ModelConfig, seq_len: int | None = None) -> "ParallelDims":
        """Reject layouts the model cannot be split into, naming the constraint and a valid alternative."""
        def fail(msg: str) -> None:
            raise ConfigError(f"parallel layout: {msg}")

        c = config
        if c.num_attention_heads % self.tp:
            fail(f"TP={self.tp} must divide num_attention_heads={c.num_attention_heads}; try TP in "
                 f"{_divisors(c.num_attention_heads)}")
        if c.intermediate_size % self.tp:
            fail(f"TP={self.tp} must divide intermediate_size={c.intermediate_size}")
        if c.vocab_size % self.tp:
            fail(f"TP={self.tp} must divide vocab_size={c.vocab_size}")
        if c.n_routed_experts:
            if c.n_routed_experts % self.ep:
                fail(f"EP={self.ep} must divide n_routed_experts={c.n_routed_experts}; try EP in "
                     f"{_divisors(c.n_routed_experts)}")
            if c.moe_intermediate_size % self.etp:
                fail(f"ETP={self.etp} must divide moe_intermediate_size={c.moe_intermediate_size}")
            if self.stage_size % (self.ep * self.etp):
                fail(f"EP x ETP = {self.ep * self.etp} must divide DP x CP x TP = {self.stage_size} (the ranks of one "
                     f"pipeline stage); e.g. EP={_largest_divisor(self.stage_size, c.n_routed_experts)} with ETP=1")
        elif self.ep > 1 or self.etp > 1:
            fail("EP and ETP need a model with routed experts (n_routed_experts)")
        if self.pp0_layers is not None and self.pp == 1:
            fail("pp0_layers (MP_PP0_LAYERS) sets the first pipeline stage's layers and needs PP > 1")
        self.stage_layers(c.num_hidden_layers)
        if seq_len is not None:
            chunks = 2 * self.cp if self.cp > 1 else 1
            shards = chunks * (self.tp if self.sp else 1)
            if seq_len % shards:
                fail(f"seq_len={seq_len} must be divisible by {shards} (2 x CP chunks"
                     f"{' x TP for sequence parallel' if self.sp else ''})")
        return self

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Layer indices of each pipeline stage (virtual stages included, in schedule order)."""
        pp = self.pp
        if pp == 1:
            counts = [num_layers]
        elif self.pp0_layers is not None:
            rest = num_layers - self.pp0_layers
            if not 0 < self.pp0_layers < num_layers or rest % (pp - 1):
                raise ConfigError(
                    f"parallel layout: with PP={pp} and pp0_layers={self.pp0_layers}, the remaining "
                    f"{num_layers - self.pp0_layers} layers must split evenly over {pp - 1} stages")
            counts = [self.pp0_layers] + [rest // (pp - 1)] * (pp - 1)
        else:
            if num_layers % pp:
                options = [f for f in range(1, num_layers) if (num_layers - f) % (pp - 1) == 0][:3]
                raise ConfigError(
                    f"parallel layout: {num_layers} layers do not split evenly over PP={pp} stages; set an uneven "
                    f"first stage with pp0_layers (MP_PP0_LAYERS), e.g. one of {options}")
            counts = [num_layers // pp] * pp
        if self.vp_layers:
            # Virtual stages: the layers in order, in chunks of vp_layers; chunk s runs on pipeline rank s % PP.
            if self.pp0_layers is not None:
                raise ConfigError("parallel layout: pp0_layers (MP_PP0_LAYERS) cannot be combined with vp_layers "
                                  "(MP_VP); use one of them")
            chunks = num_layers // self.vp_layers
            if num_layers % self.vp_layers or chunks % pp or chunks == pp:
                raise ConfigError(
                    f"parallel layout: {num_layers} layers in chunks of vp_layers={self.vp_layers} (MP_VP) must give "
                    f"a multiple of PP={pp} chunks, more than PP; e.g. vp_layers="
                    f"{next((v for v in range(num_layers // (2 * pp), 0, -1) if num_layers % (v * pp) == 0), 1)}")
            return [list(range(i, i + self.vp_layers)) for i in range(0, num_layers, self.vp_layers)]
        stages, start = [], 0
        for n in counts:
            stages.append(list(range(start, start + n)))
            start += n
        return stages

    def describe(self) -> str:
        parts = [f"DP={self.dp}", f"TP={self.tp}{'+SP' if self.sp else ''}", f"PP={self.pp}", f"CP={self.cp}",
                 f"EP={self.ep}", f"ETP={self.etp}"]
        if self.pp0_layers is not None:
            parts.append(f"PP0_LAYERS={self.pp0_layers}")
        if self.vp_layers:
            parts.append(f"VP_LAYERS={self.vp_layers}")
        return " ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _largest_divisor(n: int, m: int) -> int:
    return max(d for d in _divisors(n) if m % d == 0)
