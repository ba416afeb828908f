"""Flow containers: :class:`SequenceFlow` (FrEIA ``SequenceINN`` subset) and :class:`ParallelFlows` (one flow per scale)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn



class SequenceFlow(nn.Module):
    """A chain of invertible modules with FrEIA's ``SequenceINN`` interface and ``state_dict`` keys.

    ``SequenceFlow(C, 1, 1)`` then ``.append(AllInOneBlock, cond=0, cond_shape=(64, 1, 1), ...)``
    builds the same module list (``module_list.{i}``) as ``FrEIA.framework.SequenceINN``, so state
    dicts move between the two. Modules follow FrEIA's contract
    ``module([x], c=[...], rev=..., jac=...) -> ((y,), logdet)``.

    Args:
        *dims: input shape without the batch dim, e.g. ``(C, 1, 1)``.
    """

    def __init__(self, *dims: int) -> None:
        super().__init__()
        if not dims:
            raise ValueError("SequenceFlow needs the input shape, e.g. SequenceFlow(C, 1, 1)")
        self.shapes: list[tuple[int, ...]] = [tuple(int(d) for d in dims)]
        self.conditions: list[int | None] = []
        self.module_list = nn.ModuleList()

    def append(
        self,
        module_class: Callable[..., nn.Module],
        cond: int | None = None,
        cond_shape: Sequence[int] | None = None,
        **kwargs,
    ) -> None:
        """Append ``module_class([current shape], **kwargs)``.

        Args:
            module_class: an invertible module class (this package's or FrEIA's).
            cond: index into the condition list passed to :meth:`forward`, or ``None``.
            cond_shape: shape of that condition (``dims_c=[cond_shape]`` for the module).
            **kwargs: further constructor arguments.
        """
        dims_in = [self.shapes[-1]]
        if cond is not None:
            if cond_shape is None:
                raise ValueError("append(cond=...) needs cond_shape, the shape of that condition, e.g. (64, 1, 1)")
            kwargs["dims_c"] = [tuple(cond_shape)]
        module = module_class(dims_in, **kwargs)
        out = module.output_dims(dims_in)
        if len(out) != 1:
            raise ValueError(f"{type(module).__name__} has {len(out)} outputs; SequenceFlow needs exactly one")
        self.module_list.append(module)
        self.conditions.append(cond)
        self.shapes.append(tuple(out[0]))

    def __getitem__(self, item: int) -> nn.Module:
        return self.module_list[item]

    def __len__(self) -> int:
        return len(self.module_list)

    def __iter__(self):
        return iter(self.module_list)

    def forward(
        self,
        x_or_z: torch.Tensor,
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the chain forward, or backward with ``rev=True``.

        Args:
            x_or_z: ``[B, *dims]`` (a one-tensor list/tuple is accepted).
            c: list of conditions, indexed by each module's ``cond``.
            rev, jac: as in FrEIA.

        Returns:
            ``(output [B, *dims], logdet [B])``, the log-det summed over modules (nats).
        """
        if isinstance(x_or_z, (list, tuple)):
            if len(x_or_z) != 1:
                raise ValueError(f"SequenceFlow has one input, got {len(x_or_z)} tensors")
            x_or_z = x_or_z[0]
        if not isinstance(x_or_z, torch.Tensor):
            raise TypeError(f"x_or_z must be a tensor [B, ...], got {type(x_or_z).__name__}")
        out = (x_or_z,)
        logdet: torch.Tensor | float = 0.0
        order = reversed(range(len(self.module_list))) if rev else range(len(self.module_list))
        for i in order:
            index = self.conditions[i]
            if index is None:
                out, j = self.module_list[i](out, rev=rev, jac=jac)
            else:
                if c is None or index >= len(c):
                    raise ValueError(f"module {i} needs condition c[{index}] but c has {0 if c is None else len(c)} entries")
                out, j = self.module_list[i](out, c=[c[index]], rev=rev, jac=jac)
            logdet = j + logdet
        result = out[0]
        if not isinstance(logdet, torch.Tensor):
            logdet = torch.full((result.shape[0],), float(logdet), dtype=result.dtype, device=result.device)
        return result, logdet


class ParallelFlows(nn.Module):
    """Independent flows, one per scale: ``flows[k]`` maps ``x_k`` to ``z_k``.

    ``state_dict`` keys: ``flows.{k}.*`` (for :class:`SequenceFlow` flows,
    ``flows.{k}.module_list.{i}.*``, FrEIA ``SequenceINN`` keys per scale).

    Args:
        flows: the per-scale flows, each ``flow(x, c=None, rev=False, jac=True) -> (z, logdet [B])``
            (as :class:`SequenceFlow`).
    """

    def __init__(self, flows: Sequence[nn.Module]) -> None:
        super().__init__()
        flows = list(flows)
        if not flows:
            raise ValueError("ParallelFlows needs at least one flow")
        self.flows = nn.ModuleList(flows)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        conditions: Sequence[torch.Tensor | None] | None = None,
        rev: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per scale ``k``: ``flows[k](features[k], [conditions[k]], rev)`` (no condition where ``None``).

        Args:
            features: ``[B, C_k, H_k, W_k]`` per scale.
            conditions: ``[B, C_cond, H_k, W_k]`` (or ``None``) per scale, or ``None`` for no conditions.

        Returns:
            ``(outputs, logdets)``: per-scale outputs and ``[B]`` log-dets (nats).
        """
        if conditions is None:
            conditions = [None] * len(features)
        if len(features) != len(self.flows) or len(conditions) != len(self.flows):
            raise ValueError(
                f"ParallelFlows has {len(self.flows)} scales, got {len(features)} features and {len(conditions)} conditions"
            )
        outputs, logdets = [], []
        for flow, x, cond in zip(self.flows, features, conditions):
            z, logdet = flow(x, None if cond is None else [cond], rev=rev)
            outputs.append(z)
            logdets.append(logdet)
        return outputs, logdets


__all__ = ["ParallelFlows", "SequenceFlow"]
