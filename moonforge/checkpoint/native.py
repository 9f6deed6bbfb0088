"""moonforge checkpoints: one DCP directory per saved iteration, for converted models and training runs alike.

    CKPT/moonforge.json     {"format": "moonforge", "version": 1}
    CKPT/config.json        the Hugging Face model config
    CKPT/<tokenizer files>  tiktoken.model, tokenizer_config.json, ... as found in the source
    CKPT/iter_0000100/      DCP files (.metadata, __<rank>_<n>.distcp) and meta.json, written last
    CKPT/latest             names the newest complete iteration directory

Tensors are stored under the model's own state-dict names with their global shapes, so any parallel layout
(FSDP, TP, EP, PP, or one process) loads any checkpoint: DCP reshards on load and each rank reads only what it
holds. A save goes to ``iter_N.partial`` and is renamed only once every rank has finished and ``meta.json``
(sizes and CRC-32 of every file) is written; ``latest`` then moves atomically. A process killed mid-save
therefore leaves the previous checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import get_element, set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.stateful import Stateful

from moonforge.checkpoint import dcp as dcp_files
from moonforge.checkpoint.dcp import (
    METADATA_FILE,
    HFStorageReader,
    SafeFileSystemReader,
    SafeLoadPlanner,
    check_file,
    distributed,
    file_record,
    read_metadata,
)
from moonforge.checkpoint.hf import CheckpointError, HFCheckpoint
from moonforge.config import ModelConfig
from moonforge.utils import atomic_write_bytes, atomic_write_text, fsync_dir

logger = logging.getLogger(__name__)

FORMAT_FILE = "moonforge.json"
FORMAT = {"format": "moonforge", "version": 1}
LATEST_FILE = "latest"
META_FILE = "meta.json"
PARTIAL_SUFFIX = ".partial"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
# Tokenizer (and generation) files carried along with the weights, whatever of them the source has.
TOKENIZER_FILES = ("tiktoken.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def split_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
    """(checkpoint root, iteration) for a root directory or one of its iter_* directories."""
    path = Path(path)
    m = _ITER_DIR.match(path.name)
    if m and (path.parent / FORMAT_FILE).is_file():
        return path.parent, int(m.group(1))
    return path, None


def is_native_checkpoint(path: str | Path) -> bool:
    """True for a moonforge checkpoint directory (or one of its iter_* directories)."""
    root, _ = split_checkpoint_path(path)
    try:
        return json.loads((root / FORMAT_FILE).read_text()).get("format") == FORMAT["format"]
    except (OSError, ValueError, AttributeError):
        return False


def write_checkpoint_skeleton(root: str | Path, config: ModelConfig, tokenizer_src: Path | None) -> None:
    """Write moonforge.json, config.json and the tokenizer files of ``tokenizer_src`` (atomic, idempotent)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    marker = root / FORMAT_FILE
    if marker.exists():
        try:
            existing = json.loads(marker.read_text())
        except ValueError as e:
            raise CheckpointError(f"{marker}: invalid JSON ({e})") from None
        if existing.get("format") != FORMAT["format"] or existing.get("version") != FORMAT["version"]:
            raise CheckpointError(f"{marker}: {existing} is not a moonforge checkpoint of version "
                                  f"{FORMAT['version']}; use a new directory")
    else:
        atomic_write_text(marker, json.dumps(FORMAT) + "\n")
    config.save(root / "config.json")
    if tokenizer_src is not None:
        copy_tokenizer_files(Path(tokenizer_src), root)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    return copied


def read_meta(iter_dir: Path) -> dict:
    path = iter_dir / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {iter_dir.name} is incomplete (its save was interrupted)")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(meta.get("files"), dict) or METADATA_FILE not in meta["files"]:
        raise CheckpointError(f"{path}: has no 'files' manifest listing {METADATA_FILE}")
    return meta


def verify_iteration(iter_dir: Path, checksum: bool = True, process_group=None, collective: bool = True) -> dict:
    """Check every file of an iteration against meta.json; raise CheckpointError naming the bad ones.

    With ``collective`` and torch.distributed initialised, the files are split across the group's ranks.
    """
    rank, world = _rank_world(process_group) if collective else (0, 1)
    meta = read_meta(iter_dir)
    names = sorted(meta["files"])
    errors = [e for n in names[rank::world] if (e := check_file(iter_dir, n, meta["files"][n], checksum))]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, errors, group=process_group)
        errors = [e for part in gathered for e in part]
    if errors:
        raise CheckpointError(f"{iter_dir}: checkpoint files do not match {META_FILE}:\n  " + "\n  ".join(errors))
    return meta


def _rank_world(process_group=None) -> tuple[int, int]:
    if distributed():
        return dist.get_rank(process_group), dist.get_world_size(process_group)
    return 0, 1


def resolve_iteration_dir(root: Path, iteration: int | None) -> Path:
    """The directory of ``iteration`` under ``root`` (default: the one ``latest`` names)."""
    if iteration is None:
        iteration = CheckpointManager(root).latest_iteration()
        if iteration is None:
            raise CheckpointError(f"{root}: no saved iteration (no '{LATEST_FILE}' file)")
    iter_dir = root / iteration_dirname(iteration)
    if not iter_dir.is_dir():
        raise CheckpointError(f"{iter_dir}: no such iteration; available: {_complete_iterations(root)}")
    return iter_dir


def _complete_iterations(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _ITER_DIR.match(p.name)) and (p / META_FILE).is_file())


# ---------------------------------------------------------------------------------------------------- state
class ModelState(Stateful):
    """The model's tensors under their state-dict names; several parts (pipeline stages) merge into one dict."""

    def __init__(self, model_parts: nn.Module | Iterable[nn.Module]):
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.model_parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        for part in self.model_parts:
            own = get_model_state_dict(part).keys()
            part_sd = {k: state_dict[k] for k in own if k in state_dict}
            set_model_state_dict(part, part_sd, options=StateDictOptions(strict=strict))


class OptimizerState(Stateful):
    """Optimizer states keyed by parameter name (flattened), so they reshard like the parameters."""

    def __init__(self, model_parts: nn.Module | Iterable[nn.Module],
                 optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]):
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if len(self.model_parts) != len(self.optimizers):
            raise ValueError(f"{len(self.model_parts)} model parts but {len(self.optimizers)} optimizers; "
                             "pass one optimizer per part")
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.model_parts, self.optimizers):
            merged.update(get_optimizer_state_dict(part, opt, options=self.options))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state_dict, options=self.options)


def _model_state(value) -> ModelState:
    if isinstance(value, ModelState):
        return value
    if isinstance(value, nn.Module) or (isinstance(value, (list, tuple)) and all(isinstance(v, nn.Module)
                                                                                 for v in value)):
        return ModelState(value)
    raise TypeError(f"state['model'] must be a ModelState or nn.Module(s), got {type(value).__name__}")


def _save_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Plain nested dict for DCP: model tensors at the top level under their own names, the rest by key."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "model":
            continue
        out[key] = value.state_dict() if isinstance(value, Stateful) else value
    if "model" in state:
        model_sd = _model_state(state["model"]).state_dict()
        clash = sorted(set(model_sd) & set(out))
        if clash:
            raise ValueError(f"state keys {clash} collide with model parameter names; rename them")
        out.update(model_sd)
    return out


_ABSENT = object()


def _fill_from_checkpoint(key: str, template: dict, metadata: Metadata) -> None:
    """Add to a plain-dict entry every value the checkpoint stored under ``key`` that the template lacks."""
    holder = {key: template}
    for fqn, md in metadata.state_dict_metadata.items():
        path = (metadata.planner_data or {}).get(fqn)
        if not path or path[0] != key:
            continue
        if get_element(holder, path, _ABSENT) is not _ABSENT:
            continue
        if isinstance(md, TensorStorageMetadata):
            set_element(holder, path, torch.empty(md.size, dtype=md.properties.dtype))
        else:
            set_element(holder, path, None)


def _check_request(request: dict[str, Any], metadata: Metadata, where: Path, strict: bool) -> None:
    """Clear errors for missing or mis-shaped entries, before DCP's own checks fire."""
    flat, _ = flatten_state_dict(request)
    stored = metadata.state_dict_metadata
    missing = sorted(k for k in flat if k not in stored)
    misshaped = []
    for fqn, value in flat.items():
        md = stored.get(fqn)
        if isinstance(value, torch.Tensor) and isinstance(md, TensorStorageMetadata) and value.shape != md.size:
            misshaped.append(f"{fqn}: checkpoint {tuple(md.size)} vs here {tuple(value.shape)}")
        elif isinstance(value, torch.Tensor) and isinstance(md, BytesStorageMetadata):
            misshaped.append(f"{fqn}: checkpoint holds a non-tensor value, here it is a tensor")
    parts = []
    if missing and strict:
        groups = sorted({m.split(".")[0] if not m.startswith(("model.", "lm_head.")) else "model" for m in missing})
        shown = missing[:20] + ([f"... {len(missing) - 20} more"] if len(missing) > 20 else [])
        parts.append(f"  missing ({len(missing)}, under {', '.join(groups)}): " + "; ".join(shown))
        parts.append("  (a converted checkpoint holds model weights only: load it with strict=False, or with "
                     "load_model_weights)")
    if misshaped:
        parts.append(f"  mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    if parts:
        raise CheckpointError(f"{where}: checkpoint does not match the state being loaded\n" + "\n".join(parts))


# ---------------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Save and resume training state under one checkpoint root (collective calls are marked).

    Construction is collective when ``async_save`` is set under torch.distributed (it creates the gloo group
    that background saves use). ``keep_last`` deletes all but the newest N iterations after each save.
    """

    def __init__(self, root: str | Path, *, keep_last: int | None = None, async_save: bool = False,
                 process_group=None, verify_checksums: bool = True):
        self.root = Path(root)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.keep_last = keep_last
        self.async_save = async_save
        self.process_group = process_group
        self.verify_checksums = verify_checksums
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._async_group = None
        if async_save:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moonforge-ckpt")
            self._stager = BlockingAsyncStager()
            if distributed():
                # Background saves talk over their own gloo group so they never interleave with training's
                # collectives on the main group.
                ranks = dist.get_process_group_ranks(process_group) if process_group is not None else None
                self._async_group = dist.new_group(ranks=ranks, backend="gloo")

    # ------------------------------------------------------------------ queries
    def latest_iteration(self) -> int | None:
        """The iteration ``latest`` names, or None when nothing was saved yet."""
        path = self.root / LATEST_FILE
        if not path.is_file():
            return None
        name = path.read_text().strip()
        m = _ITER_DIR.match(name)
        if not m:
            raise CheckpointError(f"{path}: holds {name!r}, not an iteration directory name like iter_0000100")
        if not (self.root / name / META_FILE).is_file():
            raise CheckpointError(f"{path}: names {name}, which is missing or incomplete; available: "
                                  f"{_complete_iterations(self.root)}")
        return int(m.group(1))

    def iterations(self) -> list[int]:
        return _complete_iterations(self.root)

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, state: dict[str, Any], meta: dict) -> None:
        """Collective. Write ``state`` as iteration ``iteration``; ``meta`` (JSON) goes into meta.json.

        With async_save the tensors are copied to host memory here and written in the background; the
        checkpoint becomes visible when that finishes (``wait()`` blocks until then).
        """
        self.wait()
        try:
            json.dumps(meta)
        except TypeError as e:
            raise TypeError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        request = _save_dict(state)
        if self.async_save:
            staged = self._stager.stage(request)
            self._pending = self._executor.submit(self._write, iteration, staged, dict(meta), self._async_group)
        else:
            self._write(iteration, request, dict(meta), self.process_group)

    def wait(self) -> None:
        """Block until a pending asynchronous save is complete (re-raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _write(self, iteration: int, request: dict, meta: dict, group) -> None:
        rank, world = _rank_world(group)
        name = iteration_dirname(iteration)
        final, tmp = self.root / name, self.root / (name + PARTIAL_SUFFIX)
        start = time.time()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f"iter_*{PARTIAL_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        if world > 1:
            dist.barrier(group=group)
        writer = FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True, overwrite=True)
        dcp_files.save(request, writer, process_group=group)
        # Each rank checksums a share of the files; rank 0 records them all.
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        records = {n: file_record(tmp / n) for n in files[rank::world]}
        if world > 1:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, records, group=group)
            records = {k: v for part in gathered for k, v in part.items()}
        if rank == 0:
            meta.update(iteration=iteration, world_size=world, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        torch_version=torch.__version__, files=dict(sorted(records.items())))
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")
            fsync_dir(tmp)
            replaced = None
            if final.exists():  # saving an iteration again: keep the old copy until the new one is in place
                replaced = self.root / (name + ".replaced" + PARTIAL_SUFFIX)
                os.replace(final, replaced)
            os.replace(tmp, final)
            fsync_dir(self.root)
            if replaced is not None:
                shutil.rmtree(replaced)
            atomic_write_text(self.root / LATEST_FILE, name + "\n")
            fsync_dir(self.root)
            self._prune()
            total = sum(r["size"] for r in records.values())
            logger.info("saved %s (%.2f GB) in %.1f s", final, total / 1e9, time.time() - start)
        if world > 1:
            dist.barrier(group=group)

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        for old in self.iterations()[:-self.keep_last]:
            shutil.rmtree(self.root / iteration_dirname(old), ignore_errors=True)

    # ------------------------------------------------------------------ load
    def load(self, state: dict[str, Any], iteration: int | None = None, *, strict: bool = True) -> dict:
        """Collective. Fill ``state`` in place from a saved iteration (default: latest); returns its meta.

        ``state`` has the shape given to ``save``: "model" (ModelState or modules), Stateful objects (their
        ``load_state_dict`` is called), and plain dicts (filled with what was saved under their key). Files are
        checked against meta.json first. With ``strict=False`` entries absent from the checkpoint are skipped.
        """
        self.wait()
        iter_dir = resolve_iteration_dir(self.root, iteration)
        meta = verify_iteration(iter_dir, self.verify_checksums, self.process_group)
        metadata = read_metadata(iter_dir)
        request: dict[str, Any] = {}
        model_sd: dict[str, Any] | None = None
        for key, value in state.items():
            if key == "model":
                continue
            if isinstance(value, Stateful):
                request[key] = value.state_dict()
            elif isinstance(value, dict):
                _fill_from_checkpoint(key, value, metadata)
                request[key] = value
            else:
                raise TypeError(f"state[{key!r}] must be a Stateful or a dict, got {type(value).__name__}")
        if "model" in state:
            model_sd = _model_state(state["model"]).state_dict()
            request.update(model_sd)
        _check_request(request, metadata, iter_dir, strict)
        dcp_files.load(request, SafeFileSystemReader(iter_dir), SafeLoadPlanner(allow_partial_load=not strict),
                  self.process_group)
        for key, value in state.items():
            if key == "model":
                _model_state(value).load_state_dict(model_sd, strict=strict)
            elif isinstance(value, Stateful) and (strict or key in _top_keys(metadata)):
                value.load_state_dict(request[key])
        logger.info("loaded %s", iter_dir)
        return meta


def _top_keys(metadata: Metadata) -> set[str]:
    return {path[0] for path in (metadata.planner_data or {}).values() if path}


# ---------------------------------------------------------------------------------------------------- models
def load_native_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      iteration: int | None = None):
    """Single process: the model of a moonforge checkpoint (``path`` = root or an iter_* directory)."""
    from moonforge.model import Transformer, cast_model

    root, from_path = split_checkpoint_path(path)
    iter_dir = resolve_iteration_dir(root, iteration if iteration is not None else from_path)
    verify_iteration(iter_dir, checksum=True, collective=False)
    config = ModelConfig.from_json(root / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    cast_model(model, dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    request = _model_request(model.state_dict(), config)
    metadata = read_metadata(iter_dir)
    _check_request(request, metadata, iter_dir, strict=True)
    dcp_files.load(request, SafeFileSystemReader(iter_dir), SafeLoadPlanner(), no_dist=True)
    model.reset_buffers()
    return model


def _model_request(state_dict: dict, config: ModelConfig | None) -> dict:
    if config is not None and config.tie_word_embeddings:
        return {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    return dict(state_dict)


def load_model_weights(model: nn.Module, source: str | Path, *, strict: bool = True, process_group=None) -> None:
    """Collective-safe. Fill ``model`` (plain or sharded with DTensors) from a moonforge or HF directory.

    Each rank reads only the slices its parameters hold: a moonforge checkpoint through DCP, a Hugging Face
    directory through sliced safetensors reads. The router bias stays fp32.
    """
    source = Path(source)
    config = getattr(model, "config", None)
    full_sd = get_model_state_dict(model)
    request = _model_request(full_sd, config)
    if is_native_checkpoint(source):
        root, from_path = split_checkpoint_path(source)
        iter_dir = resolve_iteration_dir(root, from_path)
        verify_iteration(iter_dir, checksum=True, process_group=process_group)
        _check_request(request, read_metadata(iter_dir), iter_dir, strict)
        dcp_files.load(request, SafeFileSystemReader(iter_dir), SafeLoadPlanner(allow_partial_load=not strict),
                  process_group)
    else:
        ckpt = HFCheckpoint(source)
        _check_hf(ckpt, request, strict)
        names = [n for n in request if n in ckpt.native_names()]
        dcp_files.load(request, HFStorageReader(ckpt, names), DefaultLoadPlanner(allow_partial_load=not strict),
                  process_group)
        ckpt.close()
    set_model_state_dict(model, full_sd, options=StateDictOptions(strict=strict))
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()


def _check_hf(ckpt: HFCheckpoint, request: dict, strict: bool) -> None:
    have = set(ckpt.native_names())
    missing = sorted(set(request) - have) if strict else []
    misshaped = [f"{n}: checkpoint {ckpt.native_shape(n)} vs model {tuple(t.shape)}"
                 for n, t in request.items() if n in have and tuple(ckpt.native_shape(n)) != tuple(t.shape)]
    if missing or misshaped:
        lines = [f"{ckpt.path}: checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + "; ".join(missing[:20]))
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}): " + "; ".join(misshaped[:20]))
        raise CheckpointError("\n".join(lines))
