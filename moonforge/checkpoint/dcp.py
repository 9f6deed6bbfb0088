"""DCP (``torch.distributed.checkpoint``) files: a safe reader, an incremental writer and file manifests.

A DCP directory holds ``.distcp`` data files (each a run of ``torch.save`` blobs) and a ``.metadata`` file that
torch writes with ``pickle``. Loading here never calls plain ``pickle.load``: ``.metadata`` goes through an
unpickler that only builds DCP's metadata classes, torch dtypes and sizes, and non-tensor values go through
``torch.load(weights_only=True)``. ``DCPWriter`` writes the same format one tensor at a time, so a converter can
stream a model through memory instead of holding it whole, and the result loads with ``dcp.load``.
``HFStorageReader`` lets ``dcp.load`` read a Hugging Face directory directly, slice by slice.
"""

from __future__ import annotations

import io
import os
import pickle
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, StorageReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.futures import Future

from moonforge.checkpoint.hf import CheckpointError, HFCheckpoint
from moonforge.utils import fsync_dir

METADATA_FILE = ".metadata"
DCP_VERSION = "1.0.0"
_CHUNK = 16 << 20

# Everything a DCP .metadata pickle may name: the metadata dataclasses, torch.Size, the layout look-up, paths.
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(
            f"{self.source}: refusing to load '{module}.{name}'; a DCP .metadata file holds only checkpoint "
            "metadata classes, so this file was not written by torch.distributed.checkpoint or was tampered with")


def read_metadata(directory: str | Path, rank: int | None = None) -> Metadata:
    """The ``Metadata`` of a DCP directory, unpickled with only DCP's own classes allowed."""
    path = Path(directory) / (METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint directory is incomplete (no DCP metadata)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or garbled pickles raise a variety of exceptions
        raise CheckpointError(f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose metadata goes through the restricted unpickler (and is read once)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_metadata(self.path, kwargs.get("rank"))
        metadata = self._metadata
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor values with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e))
            raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn!r} holds an object that is not "
                                  f"plain data (numbers, strings, lists, dicts, tensors); refused: {detail}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _ChecksumStream:
    """Write-only stream that counts bytes and keeps a running CRC-32."""

    def __init__(self, file):
        self.file = file
        self.size = 0
        self.crc = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        self.file.flush()


class DCPWriter:
    """Write a DCP checkpoint directory one whole tensor at a time (single process).

    Each tensor becomes one chunk covering its full (global) shape, so any parallel layout can load it. Data
    files roll over at ``max_file_bytes``; ``finish()`` writes ``.metadata`` last and returns the manifest.
    """

    def __init__(self, directory: str | Path, max_file_bytes: int = 4 << 30):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.state_dict_metadata: dict[str, TensorStorageMetadata] = {}
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}
        self.manifest: dict[str, dict] = {}
        self._file = None
        self._stream: _ChecksumStream | None = None
        self._name = ""
        self._count = 0

    def _open_next(self) -> None:
        self._close_current()
        self._name = f"__0_{self._count}.distcp"
        self._count += 1
        self._file = open(self.directory / self._name, "wb")
        self._stream = _ChecksumStream(self._file)

    def _close_current(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.manifest[self._name] = {"size": self._stream.size, "crc32": f"{self._stream.crc:08x}"}
        self._file = self._stream = None

    def add_tensor(self, fqn: str, tensor: torch.Tensor) -> None:
        if fqn in self.state_dict_metadata:
            raise ValueError(f"tensor {fqn} written twice")
        if self._stream is None or self._stream.size >= self.max_file_bytes:
            self._open_next()
        tensor = tensor.detach().contiguous().cpu()
        offset = self._stream.size
        # The stream keeps a CRC-32 of the whole file for meta.json; torch's per-record CRC would be a second,
        # slower pass over the same bytes (torch.load does not check it).
        crc_option = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(tensor, self._stream)
        finally:
            torch.serialization.set_crc32_options(crc_option)
        zeros = torch.Size([0] * tensor.dim())
        self.state_dict_metadata[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=tensor.dtype), size=tensor.size(),
            chunks=[ChunkStorageMetadata(offsets=zeros, sizes=tensor.size())])
        self.storage_data[MetadataIndex(fqn, zeros, 0)] = _StorageInfo(self._name, offset, self._stream.size - offset)

    def finish(self) -> dict[str, dict]:
        """Close the data files and write ``.metadata``; returns {file: {size, crc32}} of every file written."""
        self._close_current()
        metadata = Metadata(
            state_dict_metadata=self.state_dict_metadata,
            planner_data={fqn: (fqn,) for fqn in self.state_dict_metadata},
            storage_data=self.storage_data,
            storage_meta=StorageMeta(checkpoint_id=None, save_id=str(uuid.uuid4())),
            version=DCP_VERSION,
        )
        tmp = self.directory / f"{METADATA_FILE}.tmp"
        with open(tmp, "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / METADATA_FILE)
        fsync_dir(self.directory)
        self.manifest[METADATA_FILE] = file_record(self.directory / METADATA_FILE)
        return dict(self.manifest)


def file_record(path: Path) -> dict:
    """Size and CRC-32 of a file, as stored in meta.json."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return {"size": path.stat().st_size, "crc32": f"{crc:08x}"}


def check_file(directory: Path, name: str, record: dict, checksum: bool = True) -> str | None:
    """None if ``directory/name`` matches its manifest record, else what is wrong with it."""
    path = directory / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != record["size"]:
        return f"{path}: {size} bytes, meta.json records {record['size']} (truncated or overwritten)"
    if checksum:
        actual = file_record(path)["crc32"]
        if actual != record["crc32"]:
            return f"{path}: CRC-32 {actual} does not match meta.json's {record['crc32']} (corrupted)"
    return None


def tensor_entries(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    return {k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def load(request: dict, reader, planner, process_group=None, no_dist: bool | None = None) -> None:
    """``dcp.load``; single-process when torch.distributed is not initialised (or ``no_dist``), quietly."""
    no_dist = not distributed() if no_dist is None else no_dist
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(request, storage_reader=reader, planner=planner, process_group=process_group, no_dist=no_dist)
        except CheckpointException as e:
            # DCP wraps each rank's failure with its traceback text; surface our own clear message.
            for exc, _ in e.failures.values():
                if isinstance(exc, CheckpointError):
                    raise CheckpointError(str(exc)) from None
            raise


def save(request: dict, writer, process_group=None) -> None:
    """``dcp.save``; single-process when torch.distributed is not initialised."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(request, storage_writer=writer, process_group=process_group, no_dist=not distributed())


# ---------------------------------------------------------------------------------------------------- HF as DCP storage
class HFStorageReader(StorageReader):
    """Present a Hugging Face directory to ``torch.distributed.checkpoint.load`` in moonforge's names.

    Every native tensor is one chunk of its global shape; each read request is served with a sliced safetensors
    read, so a rank holding a shard (FSDP, TP, EP DTensors of any layout) reads only its slice from disk.
    """

    def __init__(self, ckpt: HFCheckpoint, names: Iterable[str] | None = None):
        super().__init__()
        self.ckpt = ckpt
        self.names = sorted(names) if names is not None else ckpt.native_names()

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args, **kwargs) -> Metadata:
        tensors = {}
        for name in self.names:
            size = torch.Size(self.ckpt.native_shape(name))
            tensors[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=self.ckpt.native_dtype(name)), size=size,
                chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)])
        return Metadata(state_dict_metadata=tensors, planner_data={n: (n,) for n in tensors},
                        storage_meta=StorageMeta(checkpoint_id=str(self.ckpt.path)))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        for item in plan.items:
            index = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
            source = self.ckpt.read(item.storage_index.fqn, index)
            target = planner.resolve_tensor(item).detach()
            target.copy_(source)
            planner.commit_tensor(item, target)
        future: Future = Future()
        future.set_result(None)
        return future

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False
