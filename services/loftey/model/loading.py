"""Strict checkpoint loading: config.json plus safetensors, nothing else.

A checkpoint folder contains `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Every tensor the model expects must be in the files with
exactly the expected shape, and the files may hold nothing else. Pickled weights
(`pytorch_model.bin`) are never read, because unpickling can run arbitrary code.

Tensors are read with plain file reads straight into the model's parameters, in row
chunks, so loading needs no second copy of the weights in memory (a memory map would count
every page of the file in the process's RSS).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loftey.model.configuration import LofteyConfig
from loftey.model.dtypes import ModelDtype, parse_model_dtype

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLED_WEIGHTS_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Upper bound on the temporary buffer used while converting a tensor's dtype or layout on load.
READ_CHUNK_BYTES = 64 * 1024 * 1024

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

# Keyword arguments that transformers' Auto classes and hub helpers pass along. A local
# folder makes them meaningless, so they are accepted and ignored.
IGNORED_HUB_KWARGS = frozenset(
    {
        "revision",
        "code_revision",
        "trust_remote_code",
        "adapter_kwargs",
        "cache_dir",
        "force_download",
        "proxies",
        "token",
        "local_files_only",
        "subfolder",
        "_from_auto",
        "_from_pipeline",
        "low_cpu_mem_usage",
        "attn_implementation",
        "use_safetensors",
    }
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file or tensor."""


class SafetensorsFile:
    """Header and data offsets of one .safetensors file.

    The format is an 8-byte little-endian header length, a JSON header mapping each tensor
    name to its dtype, shape and [begin, end) byte offsets into the data that follows.
    """

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: it is {size} bytes long")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise CheckpointError(f"{path} is not a safetensors file: header length {header_len} exceeds the file")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise CheckpointError(f"{path} has an unreadable safetensors header: {err}") from err
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise CheckpointError(
                    f"tensor {name} in {path} has dtype {entry.get('dtype')!r}; "
                    f"expected one of {sorted(SAFETENSORS_DTYPES)}"
                )
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or self.data_start + end > size:
                raise CheckpointError(f"tensor {name} in {path} has byte range [{begin}, {end}) that does not fit its shape or the file")
            self.entries[name] = (dtype, shape, self.data_start + begin)

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        """Fill `dest` (same shape, any float dtype and strides) with tensor `name`, in row chunks."""
        file_dtype, shape, offset = self.entries[name]
        rows = shape[0] if shape else 1
        row_numel = math.prod(shape[1:]) if shape else 1
        rows_per_chunk = max(1, READ_CHUNK_BYTES // max(1, row_numel * file_dtype.itemsize))
        flat_dest = dest.view(rows, row_numel) if dest.is_contiguous() else None
        with self.path.open("rb", buffering=0) as f:
            f.seek(offset)
            for first in range(0, rows, rows_per_chunk):
                last = min(rows, first + rows_per_chunk)
                if flat_dest is not None and dest.dtype == file_dtype:
                    buffer = flat_dest[first:last]  # [n, row], read in place
                else:
                    buffer = torch.empty((last - first, row_numel), dtype=file_dtype)  # [n, row]
                _read_exactly(f, buffer, self.path, name)
                if flat_dest is not None:
                    if buffer.data_ptr() != flat_dest[first:last].data_ptr():
                        flat_dest[first:last].copy_(buffer)
                else:
                    dest[first:last].copy_(buffer.view(last - first, *shape[1:]))  # [n, ...]


def _read_exactly(f, buffer: torch.Tensor, path: Path, name: str) -> None:
    view = memoryview(buffer.view(torch.uint8).numpy()).cast("B")
    done = 0
    while done < len(view):
        count = f.readinto(view[done:])
        if not count:
            raise CheckpointError(f"{path} ends inside tensor {name}")
        done += count


def find_weight_files(folder: Path) -> list[Path]:
    """List the safetensors files of a checkpoint folder, or raise CheckpointError saying why none."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    pickled = [name for name in PICKLED_WEIGHTS_NAMES if (folder / name).is_file()]
    if pickled:
        raise CheckpointError(
            f"{folder} has only pickled weights ({', '.join(pickled)}); Loftey loads safetensors only, because "
            f"unpickling a file can run arbitrary code. Convert it once, in an environment you trust: "
            f"python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{folder / pickled[0]}', weights_only=True), '{single}')\""
        )
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME})")


def group_by_block(names) -> list[tuple[str, list[str]]]:
    """Group tensor names by loading block: a whole decoder layer, else the owning module."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            block = ".".join(parts[:3])  # model.layers.{i}
        else:
            block = name.rsplit(".", 1)[0]
        blocks.setdefault(block, []).append(name)
    return list(blocks.items())


def dtype_of_files(located: dict[str, SafetensorsFile]) -> ModelDtype:
    """Pick the dtype that `dtype="auto"` means: bfloat16 if every tensor is stored so, else float32."""
    stored = {weights.entries[name][0] for name, weights in located.items()}
    return parse_model_dtype("bfloat16" if stored == {torch.bfloat16} else "float32")


def read_config(folder: Path) -> LofteyConfig:
    """Read `config.json` of a checkpoint folder into a LofteyConfig."""
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}")
    values = json.loads(path.read_text())
    model_type = values.get("model_type", LofteyConfig.model_type)
    if model_type != LofteyConfig.model_type:
        raise CheckpointError(f"{path} has model_type {model_type!r}; expected {LofteyConfig.model_type!r}")
    return LofteyConfig.from_dict(values)


def describe_config(config: LofteyConfig) -> str:
    keys = ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "use_moe", "expert_num", "mlp_bias")
    return ", ".join(f"{key}={getattr(config, key)}" for key in keys)


def check_tensors(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], folder: Path, config: LofteyConfig
) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [
        f"{name} is {list(found[name])} in the file, expected {list(shape)}"
        for name, shape in sorted(expected.items())
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if wrong_shape:
        problems.append(f"wrong shapes: {'; '.join(wrong_shape)}")
    if problems:
        raise CheckpointError(
            f"the weights in {folder} do not match its config ({describe_config(config)}): " + ". ".join(problems)
        )


def load_pretrained(
    cls: type[nn.Module],
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    config: LofteyConfig | None = None,
    dtype: ModelDtype | str | torch.dtype | None = None,
    torch_dtype: str | torch.dtype | None = None,
    device_map: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """Build `cls` from a local checkpoint folder and load its weights strictly.

    Steps:
    1) Read config.json, unless `config` is given.
    2) Build the model without allocating weights.
    3) Compare the files' tensor names and shapes with the model's, and raise
       CheckpointError naming every difference.
    4) Read each tensor into place in the requested dtype and layout, one block at a
       time. With int8, each block is quantized right after it is read.

    Args:
        dtype: "float32" (default), "bfloat16" or "int8"; see `loftey.model.dtypes`. "auto"
            means bfloat16 when the files store every tensor in bfloat16, else float32.
        torch_dtype: older name of `dtype`.
        device_map: only None or "cpu"; the model runs on CPU.
    """
    unknown = sorted(set(kwargs) - IGNORED_HUB_KWARGS)
    if unknown:
        raise TypeError(f"from_pretrained got unexpected keyword arguments: {', '.join(unknown)}")
    if device_map not in (None, "cpu"):
        raise ValueError(f"device_map must be None or 'cpu', got {device_map!r}")
    requested_dtype = dtype if dtype is not None else torch_dtype
    if requested_dtype != "auto":
        model_dtype = parse_model_dtype(requested_dtype)
    folder = Path(pretrained_model_name_or_path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass the path of a local checkpoint folder")

    # 1) config.json
    if config is None:
        config = read_config(folder)

    # 2) the model's structure, weights on the meta device
    with torch.device("meta"):
        model = cls(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}

    # 3) names and shapes
    files = [SafetensorsFile(path) for path in find_weight_files(folder)]
    located: dict[str, SafetensorsFile] = {}
    for weights in files:
        for name in weights.entries:
            if name in located:
                raise CheckpointError(f"tensor {name} appears in both {located[name].path} and {weights.path}")
            located[name] = weights
    check_tensors(expected, {name: f.entries[name][1] for name, f in located.items()}, folder, config)
    if requested_dtype == "auto":
        model_dtype = dtype_of_files(located)

    # 4) read block by block (embedding, each decoder layer, final norm, lm_head) and put
    # each block in its inference form at once, so that int8 holds one block in float32
    for block_name, names in model_dtype.load_order(model, group_by_block(expected), expected):
        block = model.get_submodule(block_name)
        state = {}
        for name in names:
            dest = model_dtype.empty_for(name, expected[name])
            located[name].read_into(name, dest)
            state[name[len(block_name) + 1:]] = dest
        block.load_state_dict(state, strict=True, assign=True)
        # Quantizing replaces modules; no reference may keep their float32 weights alive.
        del state, dest, block
        model_dtype.finish_block(model, block_name)
    model.eval()

    logger.info("loaded %s from %s as %s", cls.__name__, folder, model_dtype.name)
    return model
