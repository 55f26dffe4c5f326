"""What one training step of a config costs, measured on the real model without running it: the
peak of the memory it holds and the FLOPs of its forward and backward passes.

The model is built on the meta device and given fake tensors (``torch._subclasses.FakeTensorMode``):
every operator runs only its shape function, so a step of the paper model at 480 costs half a minute
of one core and no memory. The step is the loop's (``magnet.train.train_step``): forward (under
autocast for bf16), the loss's backward, the gradient norm and clipping, AdamW's step; the
optimizer's state exists before it, as in every step after the first. ``StorageTracker`` counts a
tensor storage as allocated when an operator returns it and as freed when the last reference to it
goes, the figure a caching allocator reports as "allocated" (sizes rounded up to CUDA's 512-byte
blocks); ``FlopCounterMode`` counts matmul, convolution and attention FLOPs in the same pass.

What this does not see (pipelines.plan adds stated allowances for them): the CUDA context and
library workspaces, the caching allocator's fragmentation, DDP's gradient buckets. The tensors are
fake CPU tensors, because the autograd engine needs a real CUDA device for a CUDA graph's backward:
bf16 is therefore measured under CPU autocast, whose op lists cast matmuls and convolutions as
CUDA's do. Boolean indexing has no fake size: it is taken as selecting ``mask_prob`` of the elements,
what Mask Grounding's predicted words (the one selection here that holds memory: 30,522 scores per
word) come to when every position holds a word; padding is never picked, so it is an upper bound.
"""

from __future__ import annotations

import gc
import hashlib
import math
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from magnet.config import Config
from magnet.models import build_model
from magnet.train import build_optimizer

Precision = Literal["fp32", "bf16"]
CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of this many bytes."""

_ATEN = torch.ops.aten
_PRIM_DEVICE = torch.ops.prim.device.default


@dataclass(frozen=True)
class StepFootprint:
    """One measured training step of one config at one batch size and precision (bytes, FLOPs)."""

    batch: int
    precision: Precision
    resident_bytes: int  # before the step: weights, buffers, AdamW's state, the batch
    timeline: tuple[int, ...]  # bytes held after each operator of the step, in order
    operators: str  # digest of the operators' sequence: steps at two batch sizes must match
    gradient_bytes: int  # every parameter's gradient (DDP keeps one more copy in its buckets)
    flops: int  # forward + backward FLOPs of matmuls, convolutions and attention
    parameters: int

    @property
    def peak_bytes(self) -> int:
        return max(self.timeline, default=self.resident_bytes)


class StorageTracker(TorchDispatchMode):
    """Bytes of tensor storage alive after each operator run under this mode (``timeline``), for
    every storage an operator returned or that was handed to ``hold``.

    Storages are told apart by identity (views share one); each is released by a weakref finalizer
    when Python frees it, as the allocator gets a block back. A fake tensor's values are unknown, so
    ``nonzero`` and boolean-mask indexing on one take ``selected`` of its elements as True.
    """

    def __init__(self, block: int = CUDA_BLOCK, selected: float = 1.0) -> None:
        super().__init__()
        self.block = block
        self.selected = selected
        self.live = 0
        self.timeline: list[int] = []
        self._operators = hashlib.sha256()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def hold(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made outside the mode (weights, optimizer state, the batch)."""
        for tensor in tensors:
            self._add(tensor)

    @property
    def operators(self) -> str:
        """Digest of the operators run so far, in order."""
        return self._operators.hexdigest()

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = -(-storage.nbytes() // self.block) * self.block
        self._seen[storage] = weakref.finalize(storage, self._release, size)
        self.live += size

    def _release(self, size: int) -> None:
        self.live -= size

    def _positions(self, mask: torch.Tensor) -> torch.Tensor:
        """What ``mask.nonzero()`` would give with ``selected`` of the mask True."""
        count = max(1, math.ceil(mask.numel() * self.selected))
        return torch.empty((count, mask.dim()), dtype=torch.long, device=mask.device)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        fake = isinstance(args[0], FakeTensor) if args else False
        if func is _PRIM_DEVICE and fake:
            # three in four operators of a step are device queries (the autograd engine, foreach
            # grouping); answered here they skip the modes below, about a fifth of the pass's time
            return args[0].fake_device
        if func is _ATEN.nonzero.default and fake:
            out = self._positions(args[0])
        elif (
            func is _ATEN.index.Tensor
            and fake
            and any(i is not None and i.dtype == torch.bool for i in args[1])
        ):
            indices = []
            for index in args[1]:
                is_mask = index is not None and index.dtype == torch.bool
                indices.extend(self._positions(index).unbind(1) if is_mask else [index])
            out = func(args[0], indices)
        else:
            out = func(*args, **kwargs)
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor)
        self.timeline.append(self.live)
        self._operators.update(str(func).encode())
        return out


def _cpu_flash_attention(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_ATTENTION_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward,
}
"""torch counts the CUDA attention kernels' FLOPs; these are the same formulas for the CPU kernel
that fake CPU tensors dispatch to (Swin's window attention, BERT's self-attention)."""


def measure_step(cfg: Config, batch: int, precision: Precision) -> StepFootprint:
    """Run one training step of ``cfg``'s model at ``batch`` samples on fake tensors and measure it.

    Every pass counts FLOPs, since some operators decompose otherwise under the counter and two
    passes must run the same operators to be compared; the garbage collector is held off during
    the pass, so that two passes free at the same operators too.
    """
    size, length = cfg.model.image_size, cfg.model.text.max_tokens
    model = build_model(cfg.model, "meta")  # outside the mode, which would keep weakrefs to its tensors
    collecting = gc.isenabled()
    gc.disable()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = model.to_empty(device="cpu").train()
            optimizer = build_optimizer(model, cfg.train)
            for param in model.parameters():  # AdamW's state, as every step but the first finds it
                param.grad = torch.zeros_like(param)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            image = torch.empty(batch, 3, size, size)
            mask = torch.empty(batch, size, size)
            input_ids = torch.ones(batch, length, dtype=torch.long)
            attention_mask = torch.ones(batch, length, dtype=torch.long)
            state = [value for entry in optimizer.state.values() for value in entry.values()]
            grounding = cfg.model.mask_grounding
            tracker = StorageTracker(selected=grounding.mask_prob if grounding.enabled else 1.0)
            tracker.hold(
                [*model.parameters(), *model.buffers(), *state, image, mask, input_ids, attention_mask]
            )
            resident = tracker.live
            counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
            with counter, tracker:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = model(image, input_ids, attention_mask, target_mask=mask)
                loss = out.losses["loss"]
                del out
                loss.backward()
                del loss
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                gradient_bytes = sum(g.untyped_storage().nbytes() for g in grads)
                grad_norm = torch.nn.utils.get_total_norm(grads)
                if cfg.train.grad_clip is not None:
                    torch.nn.utils.clip_grads_with_norm_(model.parameters(), cfg.train.grad_clip, grad_norm)
                del grads, grad_norm
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    finally:
        if collecting:
            gc.enable()
    return StepFootprint(
        batch=batch,
        precision=precision,
        resident_bytes=resident,
        timeline=tuple(tracker.timeline),
        operators=tracker.operators,
        gradient_bytes=gradient_bytes,
        flops=counter.get_total_flops(),
        parameters=sum(p.numel() for p in model.parameters()),
    )
