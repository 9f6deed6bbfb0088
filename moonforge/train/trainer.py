"""The training loop: continued pretraining and SFT on any parallel layout, from one CPU process to many GPUs.

One optimizer step = one global batch = GBS samples, split into micro-batches of MBS per data-parallel rank.
The loss is the sum of token cross-entropies over the whole global batch divided by its number of loss tokens
(pretraining: every token; SFT: assistant tokens), so micro-batching and data parallelism never change it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moonforge.config import ConfigError, ModelConfig, preset
from moonforge.model import Transformer, enable_fp8, positions_from_documents
from moonforge.parallel import ParallelDims, ParallelModel, build_meshes, clip_grad_norm, init_distributed, \
    materialize, parallelize
from moonforge.parallel.context import shard_sequence
from moonforge.train.balance import apply_expert_bias, collect_expert_counts
from moonforge.train.config import TrainConfig
from moonforge.train.metrics import MEASURED_MATMUL_TFLOPS, PEAK_TFLOPS, MetricsLogger
from moonforge.train.optim import build_optimizer, set_lr
from moonforge.train.schedule import LRSchedule
from moonforge.utils import seed_everything

logger = logging.getLogger("moonforge.train")


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite steps); a checkpoint was written first."""


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    loss_tokens: int
    expert_load: list[tuple[float, float]] | None = None


class Trainer:
    single_gpu_flat = True  # one GPU, AdamW: flat buffers (benchmarks switch it off to compare engines)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.model_config = resolve_model_config(cfg)
        self.dims = ParallelDims.for_world(self.world, **_parallel_kwargs(cfg)).validate(self.model_config,
                                                                                         cfg.seq_len)
        dp, mbs = self.dims.dp, cfg.micro_batch_size
        if cfg.global_batch_size % (mbs * dp):
            raise ConfigError(f"global_batch_size ({cfg.global_batch_size}) must be a multiple of micro_batch_size x "
                              f"data-parallel size ({mbs} x {dp} = {mbs * dp})")
        self.grad_accum = cfg.global_batch_size // (mbs * dp)
        self._moe_rows: torch.Tensor | None = None
        self.defer_grad_sync = cfg.parallel.defer_grad_sync
        if self.defer_grad_sync is None:
            # One rank too: its FSDP "reduce-scatter" is a copy in and out of every gradient per micro-batch.
            self.defer_grad_sync = self.dims.pp == 1 and not cfg.optimizer_offload
        if self.defer_grad_sync and self.dims.pp > 1:
            raise ConfigError("parallel.defer_grad_sync needs pp 1: the pipeline schedule drives FSDP's gradient "
                              "synchronisation itself")
        if self.dims.pp > 1 and self.dims.vp_layers and self.grad_accum % self.dims.pp:
            raise ConfigError(f"interleaved pipeline (vp_layers) needs gradient-accumulation steps "
                              f"({self.grad_accum}) divisible by PP ({self.dims.pp})")
        _check_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)
        self.meshes = build_meshes(self.dims, self.device, replicate=cfg.parallel.data_parallel == "replicate")
        self.output_dir = Path(cfg.output_dir)
        # One GPU and mixed precision: flat buffers and a fused optimizer instead of single-rank FSDP.
        # With optimizer_offload its state streams from host memory (bf16 only; fp16 keeps FSDP's CPU offload).
        self.flat = (self.single_gpu_flat and self.world == 1 and self.device.type == "cuda"
                     and cfg.precision in ("bf16", "fp16", "fp8")
                     and cfg.optimizer == "adamw" and (not cfg.optimizer_offload or cfg.precision == "bf16"))
        self.pm = self._build_model()
        if cfg.init_from and not self._resumable():
            self._load_init_weights()
        self.optimizer = self._build_optimizer()
        self.train_iters, self.warmup_iters, decay_iters = cfg.iterations()
        self.schedule = LRSchedule(cfg.lr, cfg.min_lr, self.warmup_iters, decay_iters, cfg.lr_decay_style)
        self.loss_scale = (cfg.loss_scale or 2.0 ** 16) if cfg.precision == "fp16" else 1.0
        self.good_steps_since_scale = 0
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_total = 0
        self.skipped_in_a_row = 0
        self._global_tokens = 1
        self.pp_schedule = self._build_pp_schedule() if self.dims.pp > 1 else None
        self.train_loader, self.valid_loader = self._build_data()
        self.checkpoints = self._build_checkpointing()
        self.metrics = MetricsLogger(self.output_dir, enabled=self.rank == 0, tensorboard=cfg.tensorboard)
        self._load_initial_state()

    # ------------------------------------------------------------------ set-up
    def _build_model(self) -> ParallelModel:
        cfg = self.cfg
        with torch.device("meta"):
            model = Transformer(self.model_config)
        if cfg.precision == "fp8":
            # Cached copies pay off when a step uses each weight more than once: several micro-batches, or a
            # forward computed again (recomputation); otherwise they would only cost memory.
            reused = self.grad_accum > 1 or cfg.activation_checkpointing != "none"
            switched = enable_fp8(model, cache_weights=cfg.fp8_cache_weights and reused)
            logger.info("fp8: %d modules compute their products in FP8 (%s ...)", len(switched),
                        ", ".join(switched[:3]))
        param_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                       "fp8": torch.bfloat16}[cfg.precision]
        use_fsdp = not self.flat and (self.dims.stage_size > 1 or param_dtype != torch.float32)
        pm = parallelize(model, self.meshes, param_dtype=param_dtype, reduce_dtype=torch.float32, use_fsdp=use_fsdp,
                         replicate=cfg.parallel.data_parallel == "replicate",
                         # One data-parallel rank, or pipeline micro-batches: re-gathering weights buys nothing.
                         reshard_after_forward=(cfg.parallel.reshard_after_forward and self.dims.pp == 1
                                                and self.dims.stage_size > 1),
                         activation_checkpointing=cfg.activation_checkpointing, ac_layers=cfg.ac_layers,
                         compile=cfg.compile, compile_blocks=cfg.compile_blocks,
                         attention_backend=cfg.attention_backend,
                         offload_fraction=cfg.optimizer_offload, ep_dispatcher=cfg.parallel.ep_dispatcher,
                         cache_expert_casts=cfg.parallel.cache_expert_casts)
        materialize(pm, self.device, init_seed=None if cfg.init_from else cfg.seed)
        for moe in pm.moe_layers():
            moe.aux_loss_coeff = cfg.aux_loss_coeff
            moe.aux_loss_scale = 1.0 / cfg.global_batch_size
        return pm

    def _build_optimizer(self):
        cfg = self.cfg
        if not self.flat:
            return build_optimizer(cfg, list(self.pm.named_parameters()), self.device)
        from moonforge.train.flat_adamw import FlatAdamW
        from moonforge.train.optim import is_no_decay

        norm_decay = bool(cfg.norm_weight_decay)
        return FlatAdamW(list(self.pm.named_parameters()), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                         eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                         no_decay=lambda n, p: not norm_decay and is_no_decay(n, p),
                         compute_dtype=torch.float16 if cfg.precision == "fp16" else torch.bfloat16,
                         keep_fp32=lambda n: cfg.router_fp32 and n.endswith("mlp.gate.weight"),
                         accumulate_fp32=self.grad_accum > 1,
                         moment_dtype=torch.bfloat16 if cfg.optimizer_state_dtype == "bf16" else torch.float32,
                         offload=cfg.optimizer_offload)

    def _resumable(self) -> bool:
        from moonforge.checkpoint.native import CheckpointManager

        return self.cfg.resume and CheckpointManager(self.output_dir / "checkpoint").latest_iteration() is not None

    def _load_init_weights(self) -> None:
        from moonforge.checkpoint.native import load_model_weights

        for part in self.pm.parts:
            load_model_weights(part, self.cfg.init_from)
        logger.info("initialised weights from %s", self.cfg.init_from)

    def _build_pp_schedule(self):
        from moonforge.parallel.pipeline import build_schedule

        def loss_fn(loss_sum, labels):  # the last stage already returns the summed cross-entropy
            return loss_sum * self.loss_scale / self._global_tokens

        return build_schedule(self.pm.parts, self.pm.stage_ids, self.meshes, self.grad_accum, loss_fn)

    def _build_data(self):
        from moonforge.train.data import build_loaders

        return build_loaders(self.cfg, self.meshes, self.train_iters, self.model_config.vocab_size)

    def _build_checkpointing(self):
        from moonforge.checkpoint.native import CheckpointManager, write_checkpoint_skeleton

        root = self.output_dir / "checkpoint"
        if self.rank == 0:
            tokenizer_src = _tokenizer_source(self.cfg)
            write_checkpoint_skeleton(root, self.model_config, tokenizer_src)
        if dist.is_initialized():
            dist.barrier()
        return CheckpointManager(root, keep_last=self.cfg.keep_last, async_save=self.cfg.async_save)

    def _state(self, with_rng: bool = True) -> dict:
        from moonforge.checkpoint.native import ModelState, OptimizerState

        state = {
            "model": ModelState(self.pm.parts),
            "optimizer": OptimizerState(self.pm.parts, [self.optimizer]),
            "dataloader": self.train_loader.state_dict(),
            "trainer": {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                        "skipped_total": self.skipped_total, "loss_scale": self.loss_scale,
                        "good_steps_since_scale": self.good_steps_since_scale},
        }
        if with_rng:  # per rank; restored only when the world size is unchanged
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            state["rng"] = {f"rank{self.rank}": rng}
        return state

    def _load_initial_state(self) -> None:
        from moonforge.checkpoint.native import iteration_dirname, read_meta

        latest = self.checkpoints.latest_iteration() if self.cfg.resume else None
        if latest is not None:
            saved_world = read_meta(self.checkpoints.root / iteration_dirname(latest)).get("world_size")
            state = self._state(with_rng=saved_world == self.world)
            meta = self.checkpoints.load(state, latest)
            if "rng" in state:
                rng = state["rng"][f"rank{self.rank}"]
                torch.set_rng_state(rng["cpu"])
                if "cuda" in rng:
                    torch.cuda.set_rng_state(rng["cuda"], self.device)
            t = state["trainer"]
            self.iteration, self.consumed_samples = int(t["iteration"]), int(t["consumed_samples"])
            self.skipped_total, self.loss_scale = int(t["skipped_total"]), float(t["loss_scale"])
            self.good_steps_since_scale = int(t["good_steps_since_scale"])
            self.train_loader.load_state_dict(state["dataloader"])
            logger.info("resumed from %s at iteration %d (%s)", self.checkpoints.root, self.iteration,
                        meta.get("layout", "layout not recorded"))

    # ------------------------------------------------------------------ one step
    def _prepare(self, batch) -> dict:
        # Positions are always explicit: under sequence or context parallelism a rank sees only part of a row.
        ids, labels, docs = batch.input_ids, batch.labels, batch.document_ids
        positions = (positions_from_documents(docs) if docs is not None
                     else torch.arange(ids.shape[1]).expand_as(ids))
        cp = self.dims.cp
        if cp > 1:
            if docs is None:
                docs = torch.zeros_like(ids)
            rank = self.meshes.coordinate("cp")
            ids, labels, docs, positions = (shard_sequence(t, cp, rank) for t in (ids, labels, docs, positions))
        out = {"tokens": ids, "labels": labels, "position_ids": positions}
        if docs is not None:
            out["document_ids"] = docs
        return {k: v.to(self.device, non_blocking=True) for k, v in out.items()}

    def _global_loss_tokens(self, micro_batches, on_device: bool = False) -> int | torch.Tensor:
        """This step's loss tokens over all data-parallel ranks, counted on the host. With several ranks they are
        summed by a collective; ``on_device`` leaves that sum on the device (int64, at least 1) rather than
        waiting for it, so a training step starts without a host synchronisation."""
        local = sum(int(b.num_loss_tokens()) for b in micro_batches)
        if self.world == 1:
            return max(local, 1) if on_device else local
        total = torch.full((), local, dtype=torch.int64, device=self.device)  # a fill kernel: no host copy to wait on
        dist.all_reduce(total, group=self.meshes.world.get_group("dp"))
        return total.clamp(min=1) if on_device else int(total.item())

    def train_step(self, micro_batches) -> StepResult:
        """Forward and backward over this rank's micro-batches of one global batch, then one optimizer step."""
        pm = self.pm
        self._global_tokens = self._global_loss_tokens(micro_batches, on_device=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.pp_schedule is None:
            part = pm.parts[0]
            for i, batch in enumerate(micro_batches):
                if self.defer_grad_sync:
                    pm.set_gradient_sync(i == len(micro_batches) - 1)
                inp = self._prepare(batch)
                loss = part(inp.pop("tokens"), **inp) / self._global_tokens
                (loss * self.loss_scale).backward()
                loss_sum += loss.detach().double()
            if self.defer_grad_sync:
                pm.end_gradient_sync_step()
        else:
            loss_sum += self._pipeline_forward_backward(micro_batches)
        pm.reduce_gradients()
        grad_norm = self._clip_gradients()
        if hasattr(self.optimizer, "prepare"):
            self.optimizer.prepare()  # its host work, while the device still runs the backward
        routers = pm.routers()
        counts = collect_expert_counts(routers, group=self.meshes.stage.get_group() if self.world > 1 else None)
        load = self._expert_load(counts)
        # The step's one host synchronisation, for the loss, the gradient norm, the loss tokens (summed on the
        # device with several ranks) and the expert loads; the clip coefficient already lives on the device,
        # and the bias update is queued after the verdict on the step.
        tokens = self._global_tokens  # on the device with several ranks
        on_device = [tokens.double().view(1)] if isinstance(tokens, torch.Tensor) else []
        parts = [self._reduce_loss(loss_sum).view(1), grad_norm.double().view(1), *on_device]
        values = torch.cat(parts if load is None else [*parts, load.flatten()]).tolist()
        loss, grad_norm, rest = values[0], values[1], values[2:]
        loss_tokens = int(rest.pop(0)) if on_device else tokens
        expert_load = None if load is None else [(round(a, 4), round(b, 4)) for a, b in zip(rest[::2], rest[1::2])]
        finite = math.isfinite(grad_norm) and math.isfinite(loss)
        if finite:
            self.optimizer.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_total += 1
            self.skipped_in_a_row += 1
        self._update_loss_scale(finite)
        apply_expert_bias(routers, counts, self.cfg.expert_bias_update_rate if finite else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=not finite, loss_tokens=loss_tokens,
                          expert_load=expert_load)

    def _clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16), take the global gradient norm and clip to ``clip_grad``; returns the norm."""
        if self.flat:
            opt = self.optimizer
            if self.loss_scale != 1.0:
                for grad in opt.gradients():
                    grad.div_(self.loss_scale)
            norm = opt.grad_norm_squared().sqrt()
            if self.cfg.clip_grad > 0:
                opt.clip_coef.copy_((self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0))
            return norm
        params = [p for p in self.pm.parameters() if p.grad is not None]
        if self.loss_scale != 1.0:
            for p in params:
                p.grad.div_(self.loss_scale)
        coef = getattr(self.optimizer, "clip_coef", None)  # optimizers that clip inside their fused update
        norm = clip_grad_norm(params, self.cfg.clip_grad if coef is None else 0.0,
                              self.meshes if self.world > 1 else None)
        if coef is not None and self.cfg.clip_grad > 0:
            coef.copy_((self.cfg.clip_grad / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def _pipeline_forward_backward(self, micro_batches) -> torch.Tensor:
        return self._run_pipeline(self.pp_schedule.step, micro_batches) / self.loss_scale

    def _run_pipeline(self, run, micro_batches) -> torch.Tensor:
        """Feed this rank's micro-batches through the pipeline schedule (``step`` or ``eval``); the summed loss
        of the last stage (zero elsewhere)."""
        prepared = [self._prepare(b) for b in micro_batches]
        cat = {k: torch.cat([p[k] for p in prepared]) for k in prepared[0]}
        kwargs = {k: cat[k] for k in ("document_ids", "position_ids", "labels") if k in cat}
        losses: list[torch.Tensor] = []
        pm = self.pm
        if pm.has_first_stage:
            run(cat["tokens"], target=cat["labels"] if pm.has_last_stage else None, losses=losses, **kwargs)
        elif pm.has_last_stage:
            run(target=cat["labels"], losses=losses, **kwargs)
        else:
            run(**kwargs)
        return sum((l.detach().double().sum() for l in losses),
                   torch.zeros((), dtype=torch.float64, device=self.device))

    def _reduce_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The step's loss over all ranks, on the device (float64, 0-d)."""
        if self.world == 1:
            return loss_sum
        # Tensor-parallel peers computed the same loss; other pipeline stages contribute zero.
        dist.all_reduce(loss_sum)
        return loss_sum / self.dims.tp

    def _update_loss_scale(self, finite: bool) -> None:
        if self.cfg.precision != "fp16" or self.cfg.loss_scale is not None:
            return
        if not finite:
            self.loss_scale = max(self.loss_scale / 2, 1.0)
            self.good_steps_since_scale = 0
        else:
            self.good_steps_since_scale += 1
            if self.good_steps_since_scale >= 1000:
                self.loss_scale *= 2
                self.good_steps_since_scale = 0

    def _expert_load(self, counts: torch.Tensor | None) -> torch.Tensor | None:
        """Max and min expert load relative to the mean, per MoE layer of the whole model: [layers, 2] float64
        on the device (None for a model without MoE layers)."""
        layers = self.model_config.moe_layers
        if not layers:
            return None
        stats = torch.zeros(len(layers), 2, dtype=torch.float64, device=self.device)
        if counts is not None:
            rows = self._moe_rows
            if rows is None:  # this rank's MoE layers among all of them; built once (a host-to-device copy)
                rows = self._moe_rows = torch.tensor([layers.index(layer) for layer in sorted(self.pm.routers())],
                                                     device=self.device)
            extremes = torch.stack([counts.amax(dim=-1), counts.amin(dim=-1)], dim=-1).double()
            stats[rows] = extremes / counts.double().mean(dim=-1, keepdim=True).clamp(min=1e-9)
        if self.dims.pp > 1:
            dist.all_reduce(stats, group=self.meshes.group("pp"))
        return stats

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        cfg = self.cfg
        tokens_per_iter = cfg.global_batch_size * cfg.seq_len
        flops_per_token = self.model_config.flops_per_token(cfg.seq_len)
        logger.info("training %s: %d iterations, GBS %d (MBS %d x DP %d x %d accumulation), seq %d, layout %s%s",
                    "SFT" if cfg.sft else "pretraining", self.train_iters, cfg.global_batch_size,
                    cfg.micro_batch_size, self.dims.dp, self.grad_accum, cfg.seq_len, self.dims.describe(),
                    ", gradients reduced once per step" if self.defer_grad_sync and self.grad_accum > 1 else "")
        try:
            while self.iteration < self.train_iters:
                lr = self.schedule.lr_at(self.iteration)
                set_lr(self.optimizer, lr)
                micro = [self.train_loader.next_batch() for _ in range(self.grad_accum)]
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                result = self.train_step(micro)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                self.iteration += 1
                self.consumed_samples += cfg.global_batch_size
                tok_s_gpu = tokens_per_iter / elapsed / self.world
                tflops = tok_s_gpu * flops_per_token / 1e12
                record = {
                    "split": "train", "iteration": self.iteration, "train_iters": self.train_iters,
                    "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                    "loss_tokens": result.loss_tokens, "consumed_samples": self.consumed_samples,
                    "consumed_tokens": self.consumed_samples * cfg.seq_len, "step_time_s": elapsed,
                    "tokens_per_s_per_gpu": tok_s_gpu,
                    "tflops_per_gpu": tflops if self.device.type == "cuda" else None,
                    "mfu": tflops / PEAK_TFLOPS if self.device.type == "cuda" else None,
                    "matmul_ceiling_fraction": tflops / MEASURED_MATMUL_TFLOPS if self.device.type == "cuda" else None,
                    "memory_gib": _memory_gib(self.device), "skipped_steps": self.skipped_total,
                    "loss_scale": self.loss_scale if cfg.precision == "fp16" else None,
                    "expert_load_max_min": result.expert_load,
                }
                self.metrics.log(record, console=self.iteration % cfg.log_interval == 0)
                if self.skipped_in_a_row >= cfg.max_skipped_steps:
                    self.save()
                    raise TrainingStopped(
                        f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient (iteration "
                        f"{self.iteration}); stopped after saving a checkpoint. Lower the learning rate or check "
                        "the data.")
                if cfg.eval_interval and self.iteration % cfg.eval_interval == 0 and self.valid_loader is not None:
                    self.evaluate()
                if cfg.save_interval and self.iteration % cfg.save_interval == 0:
                    self.save()
            if cfg.save_final and (not cfg.save_interval or self.iteration % cfg.save_interval):
                self.save()
        finally:
            self.checkpoints.wait()
            self.metrics.close()

    def save(self) -> None:
        meta = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
                "consumed_tokens": self.consumed_samples * self.cfg.seq_len, "layout": self.dims.describe(),
                "world_size": self.world, "train_config": self.cfg.to_dict()}
        self.checkpoints.save(self.iteration, self._state(), meta)

    @torch.no_grad()
    def evaluate(self) -> float:
        for part in self.pm.parts:
            part.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        self.valid_loader.consumed_samples = 0  # every evaluation sees the same validation batches
        for _ in range(self.cfg.eval_iters):
            micro = [self.valid_loader.next_batch() for _ in range(self.grad_accum)]
            n = self._global_loss_tokens(micro)
            tokens += n
            if self.pp_schedule is None:
                for batch in micro:
                    inp = self._prepare(batch)
                    loss_sum += self.pm.parts[0](inp.pop("tokens"), **inp).double()
            else:
                loss_sum += self._pipeline_eval(micro)
        for part in self.pm.parts:
            part.train()
        if self.world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.dims.tp
        loss = float(loss_sum) / max(tokens, 1)
        self.metrics.log({"split": "valid", "iteration": self.iteration, "loss": loss}, console=True)
        return loss

    def _pipeline_eval(self, micro_batches) -> torch.Tensor:
        if not hasattr(self.pp_schedule, "eval"):
            raise NotImplementedError("validation under pipeline parallelism needs torch.distributed.pipelining's "
                                      "Schedule.eval (torch >= 2.12); set eval_interval: null")
        saved = self._global_tokens, self.loss_scale
        self._global_tokens, self.loss_scale = 1, 1.0  # the loss function then returns plain summed losses
        try:
            return self._run_pipeline(self.pp_schedule.eval, micro_batches)
        finally:
            self._global_tokens, self.loss_scale = saved


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """Architecture from the starting checkpoint, else from the ``model`` preset or directory."""
    if cfg.init_from:
        return ModelConfig.from_json(Path(cfg.init_from))
    if Path(cfg.model).is_dir() or cfg.model.endswith(".json"):
        return ModelConfig.from_json(Path(cfg.model))
    return preset(cfg.model)


def _tokenizer_source(cfg: TrainConfig) -> Path | None:
    for candidate in (cfg.data.tokenizer, cfg.init_from):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def _parallel_kwargs(cfg: TrainConfig) -> dict:
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "cp": p.cp, "ep": p.ep, "etp": p.etp, "sp": p.sp, "pp0_layers": p.pp0_layers,
            "vp_layers": p.vp_layers}


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(f"precision fp8 needs FP8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                          f"{torch.cuda.get_device_name(device)} has "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}; use precision: bf16")
    if precision in ("bf16", "fp16", "fp8") and device.type == "cpu":
        logger.warning("precision %s on the CPU is slow; fp32 is the usual choice there", precision)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except ImportError:
        return float("nan")
