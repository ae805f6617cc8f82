"""N per-image refine networks of one architecture as ONE grouped network.

Each image keeps its own parameters, BatchNorm statistics and SGD state; only the
arithmetic is shared:

* each 3x3 / 1x1 convolution is a grouped convolution with ``groups=N`` over the N images
  stacked along the channel axis (input ``(1, 3N, H, W)``, weight ``(N*out, in, k, k)``);
* each BatchNorm runs over ``N*C`` channels with a batch dimension of 1, so every channel
  is normalised with the statistics of its own image: exactly the per-image statistics
  of a solo network (whose batch is also one image);
* SGD's momentum and weight decay are elementwise, so the grouped parameters evolve
  exactly as the N solo ones would.

Parameters are stored stacked, one leaf tensor per solo parameter with a leading image
axis (``(N, *shape)``; conv weights in channels-last order when ``channels_last``). The
grouped weights are views of these leaves, so leaving and joining the batch is a slice /
concatenation of the leaves *and* of the SGD momentum buffers (a newcomer gets a zero
buffer, which SGD turns into ``0 * momentum + grad = grad``: its solo first step).

``method="vmap"`` computes the same forward with :func:`torch.func.vmap` over
:func:`torch.func.functional_call` on the stacked parameters; it exists to compare the two
formulations (``benchmarks/throughput.py``). The grouped form is the default: vmap
needs NCHW (see below) and was no faster than NCHW grouped convolutions on CPU, both about
1.7x slower than channels-last grouped ones. vmap over BatchNorm in training mode is
correct only when the vmapped dimension is not interleaved with the channels: with
channels-last weights the activations under vmap have exactly that layout, and
``batch_norm``'s backward then returns wrong input gradients (forward correct; torch
2.13, reproduced with ``vmap(F.batch_norm)`` alone on an input of strides
``(C, 3C, 1, ...)``). So ``method="vmap"`` runs NCHW only and refuses ``channels_last=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynaguide.config import RefineConfig
from dynaguide.model import RefineNet, build_model

__all__ = ["GroupedNetwork", "Method", "ParamLayout", "check_method", "merged_rows"]

Method = Literal["grouped", "vmap"]


def merged_rows(
    old: torch.Tensor | None, keep: torch.Tensor, rows: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Rows ``keep`` of a per-image tensor ``old`` followed by the new ``rows`` (a copy)."""
    parts = []
    if len(keep):
        if old is None:
            raise RuntimeError("internal error: kept images without state")
        parts.append(old.detach().index_select(0, keep))
    if rows:
        parts.append(torch.stack(list(rows)))
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


class ParamLayout:
    """How one solo parameter/buffer is stored stacked and viewed as a grouped tensor."""

    def __init__(self, name: str, shape: torch.Size, channels_last: bool):
        self.name = name
        self.shape = tuple(shape)
        self.conv = len(shape) == 4
        self.cl = channels_last and self.conv

    def to_leaf(self, t: torch.Tensor) -> torch.Tensor:
        """Solo tensor -> one row of the stacked leaf (contiguous)."""
        return (t.permute(0, 2, 3, 1) if self.cl else t).contiguous()

    def to_solo(self, row: torch.Tensor) -> torch.Tensor:
        """One row (or all rows, with a leading axis) of the leaf -> solo layout view."""
        if not self.cl:
            return row
        return row.permute(0, 3, 1, 2) if row.dim() == 4 else row.permute(0, 1, 4, 2, 3)

    def grouped(self, leaf: torch.Tensor) -> torch.Tensor:
        """The stacked leaf viewed as the grouped layer's tensor (no copy)."""
        n = leaf.shape[0]
        if not self.conv:
            return leaf.reshape(n * leaf.shape[1])
        if self.cl:
            out, kh, kw, cin = leaf.shape[1:]
            return leaf.reshape(n * out, kh, kw, cin).permute(0, 3, 1, 2)
        return leaf.reshape(n * leaf.shape[1], *leaf.shape[2:])


def check_method(method: str, channels_last: bool | None) -> bool:
    """Validate ``method`` and resolve ``channels_last`` (None: True for grouped, False for vmap)."""
    if method not in ("grouped", "vmap"):
        raise ValueError(f"method must be 'grouped' or 'vmap', got {method!r}")
    if channels_last is None:
        return method == "grouped"
    if method == "vmap" and channels_last:
        raise ValueError(
            "method='vmap' needs channels_last=False: under torch.func.vmap, batch_norm's "
            "backward returns wrong input gradients when the vmapped dimension is interleaved "
            "with the channels, which is what channels-last grouped activations are (torch "
            f"{torch.__version__}; see the dynaguide.grouped_net module docstring)"
        )
    return bool(channels_last)


class GroupedNetwork:
    """The stacked parameters, buffers and SGD state of N refine networks and their
    grouped (or vmapped) forward pass.

    Parameters
    ----------
    config : RefineConfig
        The architecture and optimiser of every network.
    device : torch.device
    channels_last : bool
        Conv weights stored (and run) channels-last.
    method : {"grouped", "vmap"}
    amp : bool
        bf16 autocast for the forward pass.
    """

    def __init__(
        self,
        config: RefineConfig,
        device: torch.device,
        *,
        channels_last: bool,
        method: Method = "grouped",
        amp: bool = False,
    ):
        self.config = config
        self.device = device
        self.method = method
        self.amp = amp
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.template = build_model(config, device=device)
        self.template.train()
        self.layout = {
            n: ParamLayout(n, p.shape, channels_last) for n, p in self.template.named_parameters()
        }
        self.buffer_names = [
            n for n, _ in self.template.named_buffers() if not n.endswith("num_batches_tracked")
        ]
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.opt: torch.optim.SGD | None = None
        self.n = 0
        self._vmapped: Callable[..., torch.Tensor] | None = None

    def rebuild(self, keep: Sequence[int], inits: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Keep the networks at positions ``keep`` (parameters, momentum and buffers sliced)
        and append one per solo state dict of ``inits`` (fresh parameters, zero momentum)."""
        cfg, dev = self.config, self.device
        keep_idx = torch.tensor(list(keep), dtype=torch.long, device=dev)
        old_momentum: dict[str, torch.Tensor | None] = {}
        if self.opt is not None:
            for name, leaf in self.params.items():
                old_momentum[name] = self.opt.state.get(leaf, {}).get("momentum_buffer")
        params: dict[str, torch.Tensor] = {}
        momentum: dict[str, torch.Tensor] = {}
        for name, lay in self.layout.items():
            rows = [lay.to_leaf(init[name].to(dev)) for init in inits]
            leaf = merged_rows(self.params.get(name), keep_idx, rows).requires_grad_(True)
            params[name] = leaf
            if cfg.momentum > 0:
                prev = old_momentum.get(name)
                momentum[name] = merged_rows(prev, keep_idx, [torch.zeros_like(r) for r in rows])
        self.buffers = {
            name: merged_rows(
                self.buffers.get(name), keep_idx, [init[name].to(dev) for init in inits]
            )
            for name in self.buffer_names
        }
        self.params = params
        self.opt = torch.optim.SGD(
            list(params.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for name, leaf in params.items():
            if name in momentum:
                self.opt.state[leaf]["momentum_buffer"] = momentum[name]
        self.n = len(keep) + len(inits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Response maps (N, C, H, W) of the N networks on their inputs ``x``
        (``(1, N * C_in, H, W)``, the images stacked along the channels)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.method == "vmap":
                return self._forward_vmap(x)
            return self._forward_grouped(x)

    def _conv(self, prefix: str, x: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
        w = self.layout[prefix + ".weight"].grouped(self.params[prefix + ".weight"])
        b = self.params[prefix + ".bias"].reshape(-1)
        return F.conv2d(x, w, b, stride=1, padding=module.padding, groups=self.n)

    def _norm(self, prefix: str, x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.buffers[prefix + ".running_mean"].view(-1),
            self.buffers[prefix + ".running_var"].view(-1),
            self.params[prefix + ".weight"].reshape(-1),
            self.params[prefix + ".bias"].reshape(-1),
            training=True,
            momentum=module.momentum if module.momentum is not None else 0.0,
            eps=module.eps,
        )

    def _forward_grouped(self, x: torch.Tensor) -> torch.Tensor:
        m: RefineNet = self.template
        first = self._conv("convs.0", x, m.convs[0])
        h = self._norm("norms.0", torch.relu(first), m.norms[0])
        for i in range(1, len(m.convs)):
            h = self._norm(
                f"norms.{i}", torch.relu(self._conv(f"convs.{i}", h, m.convs[i])), m.norms[i]
            )
        if m.skip_mode == "shared":
            h = h + first
        elif m.skip is not None:
            h = h + self._conv("skip", x, m.skip)
        out = self._norm("out_norm", self._conv("classifier", h, m.classifier), m.out_norm)
        # squeeze, not [0]: select's backward would build a zero tensor and copy into it
        response = out.unflatten(1, (self.n, self.config.n_channels)).squeeze(0)
        # In channels-last the images are interleaved within each pixel (strides C, 1,
        # W*N*C, N*C). One copy gives every image the solo response's own layout: the loss
        # kernels then see what they see alone (the native ones would copy anyway), and
        # autograd accumulates the loss gradients in the same order, bit for bit.
        return response.contiguous(memory_format=self.fmt)

    def _forward_vmap(self, x: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, vmap

        if self._vmapped is None:
            template = self.template

            def one(
                params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
            ) -> torch.Tensor:
                return functional_call(template, (params, buffers), (x,))

            self._vmapped = vmap(one, in_dims=(0, 0, 0))
        params = {n: self.layout[n].to_solo(p) for n, p in self.params.items()}
        n = self.n
        x = x.view(1, n, -1, *x.shape[2:]).transpose(0, 1)  # (N, 1, C_in, H, W)
        return self._vmapped(params, self.buffers, x)[:, 0]

    def extract_model(self, p: int, bn_batches: int) -> RefineNet:
        """The solo network of image ``p`` (a copy of its parameters; ``bn_batches``: its
        BatchNorms' ``num_batches_tracked``)."""
        model = build_model(self.config, device=self.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.layout[name].to_solo(self.params[name][p]))
            for name, buf in model.named_buffers():
                if name in self.buffers:
                    buf.copy_(self.buffers[name][p])
                else:  # num_batches_tracked
                    buf.fill_(bn_batches)
        return model.to(memory_format=self.fmt).train()
