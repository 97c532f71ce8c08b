"""QuantLinear: a linear layer holding GPTQ tensors, computed by a pluggable backend.

A backend is a class with `prepare(layer) -> state` (run once per layer, after its tensors are in place) and
`forward(layer, state, x2d) -> y2d`. Backends register by name; another module adds one with
`register_backend("name", MyBackend)` and layers switch to it with `layer.set_backend("name")`.
A backend whose state holds the whole weight in a layout of its own may say so with `self_contained(state)`;
`set_backend(name, keep_source=False)` then frees the layer's GPTQ tensors, g_idx included (one copy of the weight
less; the backend's state holds any input order it needs).
"""

import torch
from torch import nn

from quant_kernels import gptq_format

_BACKENDS: dict[str, type] = {}
RELEASED_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")  # what set_backend(keep_source=False) frees


def register_backend(name: str, backend_cls: type) -> None:
    """Make `backend_cls` available to `QuantLinear.set_backend(name)`; a later registration replaces it."""
    _BACKENDS[name] = backend_cls


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


class QuantLinear(nn.Module):
    """y = x @ W^T + b with W stored in the GPTQ format (see `gptq_format.dequantize`)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 zero_offset: int = 1, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if bits not in gptq_format.SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {gptq_format.SUPPORTED_BITS}, got {bits}")
        if not gptq_format.valid_group_size(group_size):
            raise ValueError(f"group_size must be a power of two or -1, got {group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.zero_offset = bits, group_size, zero_offset
        n_groups = gptq_format.num_groups(in_features, group_size)
        words_in = gptq_format.packed_length(in_features, bits)
        words_out = gptq_format.packed_length(out_features, bits)
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(words_in, out_features, **int32))  # (in*bits/32, out) int32
        self.register_buffer("qzeros", torch.zeros(n_groups, words_out, **int32))  # (groups, out*bits/32) int32
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=dtype, device=device))  # (groups, out)
        self.register_buffer("g_idx", gptq_format.default_g_idx(in_features, group_size, device))  # (in,) int32
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)  # (out,)
        self.backend_name = "torch"
        self._backend = None
        self._state = None  # the backend's per-layer state; rebuilt whenever the tensors change
        self.source_released = False  # the GPTQ tensors were freed: only the backend's state holds the weight

    @classmethod
    def from_quantized(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, group_size: int, zero_offset: int = 1, bias: torch.Tensor | None = None
                       ) -> "QuantLinear":
        """A layer around existing GPTQ tensors (shapes as in the buffers above); shapes are checked."""
        in_features, out_features = g_idx.shape[0], scales.shape[1]
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, zero_offset=zero_offset,
                    dtype=scales.dtype, device="meta")
        tensors = dict(qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
        if bias is not None:
            tensors["bias"] = bias
        for name, tensor in tensors.items():
            expected = getattr(layer, name).shape
            if tensor.shape != expected:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
            setattr(layer, name, tensor)
        return layer

    def set_backend(self, name: str, keep_source: bool = True) -> None:
        """Compute with backend `name` from now on; its `prepare` runs now (or at the first forward on meta).

        keep_source=False frees qweight, qzeros, scales and g_idx when the backend's state no longer needs them (the
        Triton state keeps act-order as its own permutation; g_idx is 4 bytes per input row, 15 MB over LLaMA-65B's
        layers); the layer can then not change backend, device or dtype again (reload the model for that).
        """
        if name not in _BACKENDS:
            raise ValueError(f"unknown QuantLinear backend {name!r}; available: {', '.join(available_backends())}")
        self._check_source()
        self.backend_name, self._backend, self._state = name, _BACKENDS[name](), None
        if self.qweight.device.type != "meta":
            self._state = self._backend.prepare(self)
            if not keep_source and getattr(self._backend, "self_contained", lambda state: False)(self._state):
                for buffer in RELEASED_BUFFERS:
                    setattr(self, buffer, getattr(self, buffer).new_empty(0))
                self.source_released = True

    def _check_source(self) -> None:
        if self.source_released:
            raise RuntimeError("this QuantLinear handed its GPTQ tensors to its backend at load; reload the model "
                               "to change its backend, device or dtype")

    def _apply(self, fn, *args, **kwargs):
        self._state = None  # moving or casting tensors makes prepared state stale
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._state = None
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype."""
        if self._backend is None:
            self._backend = _BACKENDS[self.backend_name]()
        if self._state is None:
            self._check_source()
            self._state = self._backend.prepare(self)
        y = self._backend.forward(self, self._state, x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def backend_state(self):
        """The backend's per-layer state (None until prepared)."""
        return self._state

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight [out_features, in_features] (nn.Linear orientation) in the scales' dtype."""
        self._check_source()
        return gptq_format.dequantize(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits,
                                      self.zero_offset).t()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={self.backend_name}")


class TorchBackend:
    """Reference backend for CPU and GPU: dequantize a block of input rows at a time, then matmul.

    Blocks keep the float temporary to about `block_elements` values, so large layers never hold a whole
    float copy of their weight.
    """

    block_elements = 1 << 22

    def prepare(self, layer: QuantLinear) -> dict:
        zeros = gptq_format.unpack_zeros(layer.qzeros, layer.bits, layer.out_features, layer.zero_offset)
        rows = max(32, self.block_elements // max(layer.out_features, 1) // 32 * 32)  # a multiple of 32: word-aligned
        return {"zeros": zeros.to(layer.scales.dtype), "groups": layer.g_idx.long(), "block_rows": rows}

    def forward(self, layer: QuantLinear, state: dict, x2d: torch.Tensor) -> torch.Tensor:
        """x2d: [M, in] -> [M, out] in x2d's dtype; computes in the scales' dtype."""
        x = x2d.to(layer.scales.dtype)
        y = torch.zeros(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
        step = state["block_rows"]
        for start in range(0, layer.in_features, step):
            stop = min(start + step, layer.in_features)
            words = layer.qweight[start * layer.bits // 32:]
            q = gptq_format.unpack_rows(words, layer.bits, stop - start)  # (rows, out) int32
            groups = state["groups"][start:stop]
            weight = layer.scales[groups] * (q.to(x.dtype) - state["zeros"][groups])  # (rows, out)
            y += x[:, start:stop] @ weight
        if layer.bias is not None:
            y += layer.bias.to(y.dtype)
        return y.to(x2d.dtype)


class DenseTorchBackend:
    """Dequantize the whole weight once at prepare, then plain matmuls: fastest on CPU for small models,
    at the cost of a float copy of the weight."""

    def prepare(self, layer: QuantLinear) -> torch.Tensor:
        return layer.dequantized_weight().t().contiguous()  # (in, out)

    def forward(self, layer: QuantLinear, weight: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        y = x2d.to(weight.dtype) @ weight
        if layer.bias is not None:
            y += layer.bias.to(y.dtype)
        return y.to(x2d.dtype)


register_backend("torch", TorchBackend)
register_backend("torch_dense", DenseTorchBackend)
