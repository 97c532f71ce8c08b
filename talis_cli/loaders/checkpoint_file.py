"""The original project's style: a model folder (config + tokenizer) and a separate GPTQ checkpoint file,
with bits and group size given by the user (or by a quantize config in the folder)."""

from __future__ import annotations

from pathlib import Path

from ..errors import TalisError
from . import register_loader
from .base import Loader, LoadRequest, has_qweights
from .gptq import read_quantize_config, settings_from
from .tensor_files import PICKLE_SUFFIXES, pickle_state_dict, read_header, stream_safetensors


@register_loader
class CheckpointFileLoader(Loader):
    name = "checkpoint"
    priority = 30

    @classmethod
    def detect(cls, request: LoadRequest) -> bool:
        return request.checkpoint is not None

    def __init__(self, request: LoadRequest):
        super().__init__(request)
        self.path = Path(request.checkpoint)
        if not self.path.is_file():
            raise TalisError(f"checkpoint file {self.path} does not exist")
        self._pickled: dict | None = None
        if self.path.suffix in PICKLE_SUFFIXES:
            self._pickled = pickle_state_dict(self.path, request.allow_pickle)
        elif self.path.suffix != ".safetensors":
            raise TalisError(f"{self.path}: unknown checkpoint type; talis reads .safetensors (and .pt/.bin with --allow-pickle)")

    def files(self) -> list[Path]:
        return [self.path]

    def tensor_shapes(self) -> dict[str, list[int]]:
        if not hasattr(self, "_shapes"):  # asked by the planner and by load: read the header once
            if self._pickled is not None:
                self._shapes = {k: list(v.shape) for k, v in self._pickled.items()}
            else:
                self._shapes = {k: shape for k, (_, shape) in read_header(self.path).items()}
        return self._shapes

    def tensors(self):
        if self._pickled is not None:
            yield from self._pickled.items()
        else:
            yield from stream_safetensors(self.path)

    def quant_settings(self, shapes):
        if not has_qweights(shapes):
            return None  # a plain fp16 checkpoint file
        found = read_quantize_config(self.folder)
        if found is not None:
            return settings_from(found[0], found[1], self.request.wbits, self.request.groupsize, shapes)
        if self.request.wbits is None:
            raise TalisError(f"{self.path}: GPTQ checkpoint without a quantize config; pass --wbits (and --groupsize)")
        qc = {"bits": self.request.wbits, "group_size": self.request.groupsize or -1}
        return settings_from(qc, self.path, None, None)
