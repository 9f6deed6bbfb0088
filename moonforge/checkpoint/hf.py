"""Hugging Face safetensors <-> moonforge tensors: names, expert layouts, sliced reads and sharded writes.

moonforge's parameter names are Hugging Face's, except the routed experts, which moonforge stacks:

    HF (Moonlight's files)   model.layers.L.mlp.experts.E.{gate,up}_proj.weight [I, H], ...down_proj.weight [H, I]
    HF (transformers 5)      model.layers.L.mlp.experts.gate_up_proj [E, 2I, H], ...experts.down_proj [E, H, I]
    moonforge                model.layers.L.mlp.experts.gate_up_proj [E, 2, I, H], ...experts.down_proj [E, H, I]

Both HF layouts are read; exports use Moonlight's per-expert layout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "F8_E4M3": torch.float8_e4m3fn}


class CheckpointError(ValueError):
    """A checkpoint is missing tensors, has unexpected or mis-shaped ones, or is unreadable."""


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header


class HFCheckpoint:
    """Lazy view of a Hugging Face model directory's safetensors, in moonforge's naming and layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        files = self._shard_files()
        for file in files:
            for name, meta in _read_header(file).items():
                dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {meta['dtype']}")
                self.tensors[name] = TensorInfo(file, tuple(meta["shape"]), dtype)
        self._native = self._map_names()
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index file ({e})") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(missing)}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files (and no model.safetensors.index.json)")
        return files

    def _map_names(self) -> dict[str, tuple]:
        """native name -> ("plain", hf) | ("per_expert", prefix, E, kind) | ("fused", hf, kind)."""
        native: dict[str, tuple] = {}
        experts: dict[tuple[str, str], set[int]] = {}
        for name in self.tensors:
            if m := _PER_EXPERT.match(name):
                prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
                kind = "down_proj" if proj == "down_proj" else "gate_up_proj"
                experts.setdefault((prefix, kind), set()).add(e)
            elif m := _FUSED_EXPERT.match(name):
                native[name] = ("fused", name, m.group(2))
            else:
                native[name] = ("plain", name)
        for (prefix, kind), ids in experts.items():
            n = max(ids) + 1
            native[f"{prefix}.{kind}"] = ("per_expert", prefix, n, kind)
        return native

    # ------------------------------------------------------------------ queries
    def native_names(self) -> list[str]:
        return sorted(self._native)

    def native_shape(self, name: str) -> tuple[int, ...]:
        source = self._native[name]
        if source[0] == "plain":
            return self.tensors[name].shape
        if source[0] == "fused":
            shape = self.tensors[source[1]].shape
            if source[2] == "gate_up_proj":
                return (shape[0], 2, shape[1] // 2, shape[2])
            return shape
        _, prefix, n, kind = source
        if kind == "gate_up_proj":
            inter, hidden = self.tensors[f"{prefix}.0.gate_proj.weight"].shape
            return (n, 2, inter, hidden)
        return (n, *self.tensors[f"{prefix}.0.down_proj.weight"].shape)

    def native_dtype(self, name: str) -> torch.dtype:
        source = self._native[name]
        if source[0] != "per_expert":
            hf = source[1]
        else:
            hf = f"{source[1]}.0.{'down_proj' if source[3] == 'down_proj' else 'gate_proj'}.weight"
        return self.tensors[hf].dtype

    def check_against(self, expected: dict[str, tuple[int, ...]], ignore_layers_from: int | None = None) -> None:
        """Raise CheckpointError listing every missing, unexpected and mis-shaped tensor."""
        have = set(self._native)
        if ignore_layers_from is not None:
            # Multi-token-prediction layers (DeepSeek-V3's layer 61) sit past the decoder; they are not used.
            extra_layers = {n for n in have if (m := _LAYER.match(n)) and int(m.group(1)) >= ignore_layers_from}
            if extra_layers:
                logger.warning("ignoring %d tensors of layers >= %d (multi-token prediction is not supported)",
                               len(extra_layers), ignore_layers_from)
            have -= extra_layers
        missing = sorted(set(expected) - have)
        unexpected = sorted(have - set(expected))
        misshaped = [f"{n}: checkpoint {self.native_shape(n)} vs model {expected[n]}"
                     for n in sorted(have & set(expected)) if tuple(self.native_shape(n)) != tuple(expected[n])]
        self._check_expert_completeness()
        if missing or unexpected or misshaped:
            parts = [f"{self.path}: checkpoint does not match the model config"]
            for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
                if items:
                    shown = items[:20] + ([f"... {len(items) - 20} more"] if len(items) > 20 else [])
                    parts.append(f"  {title} ({len(items)}): " + "; ".join(shown))
            raise CheckpointError("\n".join(parts))

    def _check_expert_completeness(self) -> None:
        missing = []
        for name, source in self._native.items():
            if source[0] != "per_expert":
                continue
            _, prefix, n, kind = source
            projs = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
            missing += [f"{prefix}.{e}.{p}.weight" for e in range(n) for p in projs
                        if f"{prefix}.{e}.{p}.weight" not in self.tensors]
        if missing:
            raise CheckpointError(f"{self.path}: missing expert tensors ({len(missing)}): " + "; ".join(missing[:20]))

    # ------------------------------------------------------------------ reads
    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _read_hf(self, hf_name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        handle = self._handle(self.tensors[hf_name].file)
        if index is None:
            return handle.get_tensor(hf_name)
        return handle.get_slice(hf_name)[index]

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """The native tensor ``name`` (or the slice ``index`` of it, one slice per dimension)."""
        source = self._native.get(name)
        if source is None:
            raise CheckpointError(f"{self.path}: no tensor for {name}")
        shape = self.native_shape(name)
        if index is None:
            index = tuple(slice(0, s) for s in shape)
        index = tuple(slice(*s.indices(dim)[:2]) for s, dim in zip(index, shape))
        if source[0] == "plain":
            return self._read_hf(name, index)
        if source[0] == "fused":
            if source[2] == "down_proj":
                return self._read_hf(source[1], index)
            e, g, i, h = index
            inter = shape[2]
            halves = [self._read_hf(source[1], (e, slice(k * inter + i.start, k * inter + i.stop), h))
                      for k in range(g.start, g.stop)]
            return torch.stack(halves, dim=1)
        _, prefix, _, kind = source
        # Fill one preallocated tensor expert by expert: no list of pieces, no stacking copy.
        out = torch.empty([s.stop - s.start for s in index], dtype=self.native_dtype(name))
        e = index[0]
        for i, x in enumerate(range(e.start, e.stop)):
            if kind == "down_proj":
                out[i] = self._read_hf(f"{prefix}.{x}.down_proj.weight", index[1:])
            else:
                for j, p in enumerate(("gate_proj", "up_proj")[index[1].start:index[1].stop]):
                    out[i, j] = self._read_hf(f"{prefix}.{x}.{p}.weight", index[2:])
        return out

    def close(self) -> None:
        self._handles.clear()


def native_to_hf(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Split a native tensor into Moonlight's published per-expert tensors (other names pass through)."""
    if m := _FUSED_EXPERT.match(name):
        prefix, kind = m.group(1), m.group(2)
        for e in range(tensor.shape[0]):
            if kind == "down_proj":
                yield f"{prefix}.{e}.down_proj.weight", tensor[e]
            else:
                yield f"{prefix}.{e}.gate_proj.weight", tensor[e, 0]
                yield f"{prefix}.{e}.up_proj.weight", tensor[e, 1]
    else:
        yield name, tensor


def hf_order_key(name: str) -> tuple:
    """Sort key giving Hugging Face's natural order: embedding, layers by index (experts by id), norm, lm_head."""
    parts = re.split(r"(\d+)", name)
    key = tuple(int(p) if p.isdigit() else p for p in parts)
    rank = 0 if name.startswith("model.embed_tokens") else 2 if name.startswith(("model.norm", "lm_head")) else 1
    return (rank, key)


def expected_native_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and global shapes of a model's parameters and persistent buffers (works on the meta device)."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def iter_state(ckpt: HFCheckpoint, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, ckpt.read(name)


# ---------------------------------------------------------------------------------------------------- writing
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class SafetensorsStreamWriter:
    """Write one safetensors file whose tensors are known in advance, one tensor at a time.

    The header (names, dtypes, shapes, offsets) is written first; ``write`` then appends each tensor's bytes
    in the planned order, so only the tensor being written is in memory.
    """

    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tensors = tensors
        header: dict[str, dict] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for t in tensors:
            header[t.name] = {"dtype": SAFETENSORS_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.path, "wb")
        self._file.write(len(raw).to_bytes(8, "little"))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.tensors[self._next]
        if name != planned.name or tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise ValueError(f"{self.path}: expected {planned} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self.tensors)

    def close(self) -> None:
        if not self.done:
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self.tensors)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's shard naming, model-00001-of-00003.safetensors (kept for one shard too: the index names it)."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"
