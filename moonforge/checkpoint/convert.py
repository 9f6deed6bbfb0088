"""Streaming conversion between Hugging Face safetensors directories and moonforge (DCP) checkpoints.

Both directions hold about one tensor in memory at a time (Moonlight's largest: a layer's stacked experts,
0.74 GB in bf16), never the model:

- hf-to-native reads each native tensor from the safetensors shards (stacking a layer's per-expert tensors),
  appends it to a DCP data file, and writes the DCP metadata at the end.
- native-to-hf plans the output shards from the DCP metadata, writes each safetensors header first, then loads
  one tensor at a time from DCP, splits the experts into Moonlight's per-expert tensors and appends them.

Outputs are written under ``OUT.partial`` and renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from moonforge.checkpoint import dcp as dcp_files
from moonforge.checkpoint.dcp import DCPWriter, SafeFileSystemReader, SafeLoadPlanner, read_metadata, tensor_entries
from moonforge.checkpoint.hf import (
    CheckpointError,
    HFCheckpoint,
    PlannedTensor,
    SafetensorsStreamWriter,
    expected_native_shapes,
    hf_order_key,
    native_to_hf as split_native,
    plan_shards,
    shard_file_name,
)
from moonforge.checkpoint.native import (
    LATEST_FILE,
    META_FILE,
    copy_tokenizer_files,
    is_native_checkpoint,
    iteration_dirname,
    resolve_iteration_dir,
    split_checkpoint_path,
    verify_iteration,
    write_checkpoint_skeleton,
)
from moonforge.config import ModelConfig
from moonforge.parallel.dims import ParallelDims
from moonforge.utils import atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


@dataclass
class Layout:
    """The seed's converter layout arguments; validated against the model and recorded, never baked in."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    pp0_layers: int | None = None

    def validate(self, config: ModelConfig) -> ParallelDims:
        """Reject layouts the model cannot be split into (heads by TP, experts by EP, layers by PP stages)."""
        import math

        # The smallest world holding this layout, as Megatron's converters enumerate it: PP x lcm(TP, EP x ETP).
        world = self.pp * math.lcm(self.tp, self.ep * self.etp)
        return ParallelDims.for_world(world, tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp,
                                      pp0_layers=self.pp0_layers).validate(config)

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.etp, "pp0_layers": self.pp0_layers}


def parse_size(text: str | int) -> int:
    """Bytes from '5GB', '500MB', '1.5GiB' or a plain integer (decimal units, binary with 'i')."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    power = " KMGT".index(unit) if unit else 0
    return int(value * (1024 if binary else 1000) ** power)


def _target_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    return dtype if dtype is not None else stored


def _prepare_output(out: Path, force: bool) -> Path:
    """A fresh ``OUT.partial`` directory; refuses a non-empty ``out`` unless ``force``."""
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        raise FileExistsError(f"{out}: already exists; choose another --out or pass --force to replace it")
    tmp = out.parent / (out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_output(tmp: Path, out: Path) -> None:
    fsync_dir(tmp)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    fsync_dir(out.parent)


def _meta_model(config: ModelConfig):
    from moonforge.model import Transformer

    with torch.device("meta"):
        return Transformer(config)


# ---------------------------------------------------------------------------------------------------- HF -> native
def hf_to_native(hf_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                 layout: Layout | None = None, force: bool = False, max_file_bytes: int = 4 << 30) -> dict:
    """Convert a Hugging Face directory into a moonforge checkpoint (iteration 0); returns timing stats.

    ``dtype`` None keeps each tensor's stored dtype; the router bias is always fp32.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    start = time.time()
    config = ModelConfig.from_json(hf_dir)
    layout = layout or Layout()
    dims = layout.validate(config)
    expected = expected_native_shapes(_meta_model(config))
    ckpt = HFCheckpoint(hf_dir)
    ckpt.check_against(expected, ignore_layers_from=config.num_hidden_layers)
    names = sorted(expected, key=hf_order_key)
    tmp = _prepare_output(out, force)
    write_checkpoint_skeleton(tmp, config, hf_dir)
    iter_dir = tmp / iteration_dirname(0)
    writer = DCPWriter(iter_dir, max_file_bytes=max_file_bytes)
    total = sum(_nbytes(expected[n], _target_dtype(n, ckpt.native_dtype(n), dtype)) for n in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-native", disable=None) as bar:
        for name in names:
            tensor = ckpt.read(name)
            tensor = tensor.to(_target_dtype(name, tensor.dtype, dtype))
            writer.add_tensor(name, tensor)
            bar.update(tensor.nbytes)
            del tensor
            ckpt.close()  # unmap what was read, so resident memory stays at about one tensor
    files = writer.finish()
    meta = {"iteration": 0, "consumed_tokens": 0, "consumed_samples": 0, "layout": layout.to_dict(),
            "layout_description": dims.describe(), "dtype": str(dtype).removeprefix("torch.") if dtype else "source",
            "source": {"hf": str(hf_dir.resolve())}, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch_version": torch.__version__, "files": files}
    atomic_write_text(iter_dir / META_FILE, json.dumps(meta, indent=1) + "\n")
    fsync_dir(iter_dir)
    atomic_write_text(tmp / LATEST_FILE, iteration_dirname(0) + "\n")
    _commit_output(tmp, out)
    seconds = time.time() - start
    logger.info("wrote %s: %d tensors, %.2f GB in %.1f s (%.2f GB/s); layout %s recorded", out, len(names),
                total / 1e9, seconds, total / 1e9 / seconds, dims.describe())
    return {"tensors": len(names), "bytes": total, "seconds": seconds}


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


# ---------------------------------------------------------------------------------------------------- native -> HF
def native_to_hf(ckpt_dir: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                 iteration: int | None = None, max_shard_bytes: int = 5_000_000_000,
                 tokenizer_src: str | Path | None = None, force: bool = False, verify: bool = True,
                 layout: Layout | None = None) -> dict:
    """Export a moonforge checkpoint as a Hugging Face directory in Moonlight's published layout.

    Per-expert tensors, ``e_score_correction_bias`` in fp32, everything else in ``dtype`` (default: as stored);
    safetensors shards of at most ``max_shard_bytes`` plus ``model.safetensors.index.json``; config.json; the
    tokenizer files, with a ``tokenizer.json`` generated from ``tiktoken.model`` so transformers loads it.
    ``layout`` (the seed's arguments) is only checked against the model.
    """
    start = time.time()
    root, from_path = split_checkpoint_path(ckpt_dir)
    if not is_native_checkpoint(root):
        raise CheckpointError(f"{ckpt_dir}: not a moonforge checkpoint (no moonforge.json); for a Hugging Face "
                              "directory use `moonforge convert hf-to-native` first")
    out = Path(out)
    iter_dir = resolve_iteration_dir(root, iteration if iteration is not None else from_path)
    verify_iteration(iter_dir, checksum=verify, collective=False)
    config = ModelConfig.from_json(root / "config.json")
    if layout is not None:
        layout.validate(config)
    expected = expected_native_shapes(_meta_model(config))
    stored = tensor_entries(read_metadata(iter_dir))
    missing = sorted(n for n in expected if n not in stored)
    misshaped = [f"{n}: stored {tuple(stored[n].size)} vs config {expected[n]}"
                 for n in expected if n in stored and tuple(stored[n].size) != expected[n]]
    if missing or misshaped:
        raise CheckpointError(f"{iter_dir}: does not hold the model of {root / 'config.json'}; missing "
                              f"({len(missing)}): {missing[:10]}; mis-shaped: {misshaped[:10]}")
    names = sorted(expected, key=hf_order_key)
    out_dtypes = {n: _target_dtype(n, stored[n].properties.dtype, dtype) for n in names}
    planned = [PlannedTensor(hf_name, tuple(piece.shape), out_dtypes[n])
               for n in names for hf_name, piece in split_native(n, torch.empty(expected[n], device="meta"))]
    shards = plan_shards(planned, max_shard_bytes)
    weight_map = {t.name: shard_file_name(i, len(shards)) for i, shard in enumerate(shards) for t in shard}
    total = sum(t.nbytes for t in planned)
    tmp = _prepare_output(out, force)
    reader = SafeFileSystemReader(iter_dir)
    shard_index, writer = 0, SafetensorsStreamWriter(tmp / shard_file_name(0, len(shards)), shards[0])
    with tqdm(total=total, unit="B", unit_scale=True, desc="native-to-hf", disable=None) as bar:
        for name in names:
            tensor = torch.empty(stored[name].size, dtype=stored[name].properties.dtype)
            dcp_files.load({name: tensor}, reader, SafeLoadPlanner(), no_dist=True)
            tensor = tensor.to(out_dtypes[name])
            for hf_name, piece in split_native(name, tensor):
                if writer.done:
                    writer.close()
                    shard_index += 1
                    writer = SafetensorsStreamWriter(tmp / shard_file_name(shard_index, len(shards)),
                                                     shards[shard_index])
                writer.write(hf_name, piece)
                bar.update(piece.nbytes)
            del tensor
    writer.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(out_dtypes.get("model.embed_tokens.weight", torch.bfloat16)).removeprefix("torch.")
    atomic_write_text(tmp / "config.json", json.dumps(hf_config, indent=2) + "\n")
    copied = copy_tokenizer_files(Path(tokenizer_src) if tokenizer_src else root, tmp)
    if "tiktoken.model" in copied:
        from moonforge.tokenizer_export import export_hf_tokenizer

        export_hf_tokenizer(tmp)
    elif not copied:
        logger.warning("no tokenizer files found in %s; the export has weights and config only",
                       tokenizer_src or root)
    _commit_output(tmp, out)
    seconds = time.time() - start
    logger.info("wrote %s: %d tensors in %d shards, %.2f GB in %.1f s (%.2f GB/s)", out, len(planned),
                len(shards), total / 1e9, seconds, total / 1e9 / seconds)
    return {"tensors": len(planned), "shards": len(shards), "bytes": total, "seconds": seconds}
