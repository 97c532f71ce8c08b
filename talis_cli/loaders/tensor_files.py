"""Finding, checking and streaming the tensor files of a checkpoint (safetensors; pickle only on request)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from ..errors import TalisError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")  # model-00001-of-00003.safetensors


def weight_files(folder: Path, base_name: str | None = None) -> list[Path]:
    """The safetensors files holding a model's weights, looked up in this order:
    `<base_name>.safetensors.index.json` (AutoGPTQ names its shard index after `model_file_base_name`),
    `<base_name>.safetensors`, the folder's only `*.safetensors.index.json` (HF's `model.safetensors.index.json`),
    the folder's only `.safetensors` file. Raises TalisError for several indexes, shards without their index, or
    several unrelated files."""
    if base_name:
        if (folder / f"{base_name}.safetensors.index.json").exists():
            return shard_files(folder / f"{base_name}.safetensors.index.json")
        if (folder / f"{base_name}.safetensors").exists():
            return [folder / f"{base_name}.safetensors"]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise TalisError(f"{folder}: several shard indexes ({', '.join(i.name for i in indexes)}); keep the one of "
                         f"these weights, or name it by model_file_base_name in the quantize config")
    if indexes:
        return shard_files(indexes[0])
    files = sorted(folder.glob("*.safetensors"))
    shards = [f.name for f in files if (m := SHARD_NAME.search(f.name)) and int(m.group(2)) > 1]
    if shards:
        raise TalisError(f"{folder}: {shards[0]} is one shard of a model split in files, but there is no shard index "
                         f"(*.safetensors.index.json) to join them; copy the index file that came with the shards")
    if len(files) > 1:
        raise TalisError(f"{folder}: several .safetensors files ({', '.join(f.name for f in files)}) that are not "
                         f"shards of one model; pass the one to use with --checkpoint")
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found {', '.join(pickles)}: load a pickle file with --checkpoint FILE --allow-pickle)" if pickles else ""
        raise TalisError(f"{folder}: no .safetensors weights found{hint}")
    return files


def shard_files(index: Path) -> list[Path]:
    """The shard files a safetensors index (`{"weight_map": {tensor: file}}`) names, each once, in order."""
    folder = index.parent
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise TalisError(f"{index}: not a valid shard index (needs a \"weight_map\" object); "
                         f"re-export the model") from None
    files = [folder / f for f in names]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise TalisError(f"{folder}: shard(s) {', '.join(missing)} named in {index.name} are missing; "
                         f"copy the whole model folder")
    return files


def read_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) from a safetensors header, checking that the file holds all the data it declares."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length is beyond the end of the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise TalisError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt — copy it again") from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise TalisError(f"{path}: file is truncated ({size} bytes, the header declares {8 + n + end}); copy it again")
    return {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}


def stream_safetensors(path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
    """Yield (name, CPU tensor) one at a time, so host memory stays about one tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except TalisError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad files
        raise TalisError(f"{path}: cannot read tensors ({e}); the file is corrupt — copy it again") from None


def pickle_state_dict(path: Path, allow_pickle: bool) -> dict:
    """Load a .bin/.pt checkpoint, only when the user opted in, and only plain tensors (no code runs)."""
    if not allow_pickle:
        raise TalisError(f"{path}: pickle checkpoints can run code when loaded; convert it to .safetensors, or pass --allow-pickle if you trust it")
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise TalisError(f"{path}: cannot load this pickle checkpoint ({e.__class__.__name__}); convert it to .safetensors") from None
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
