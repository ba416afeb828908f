"""A drop-in replacement for FrEIA 0.2's ``AllInOneBlock`` built on the fused ops.

Constructor arguments, the ``forward(x, c=[], rev=False, jac=True) -> ((y,), logdet)`` contract,
the permutation RNG (``np.random``) and the ``state_dict`` keys are those of PyPI FrEIA 0.2, the
version MSFlow ran on, so the block replaces FrEIA's in existing code and loads its checkpoints.
Checkpoints of newer FrEIA (int64 index permutations) load too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .. import ops
from . import compat

_GLOBAL_AFFINE_TYPES = ("SOFTPLUS", "SIGMOID", "EXP")
_CLAMP_FORMS = ("tanh", "tanh_scaled")


def _to_4d(t: torch.Tensor) -> torch.Tensor:
    """View ``[B, C, *S]`` as ``[B, C, H, W]`` for the 4-D ops (coupling and permutation act per position)."""
    if t.dim() == 4:
        return t
    return t.reshape(t.shape[0], t.shape[1], -1, 1)


class AllInOneBlock(nn.Module):
    """Affine coupling + global affine ("ActNorm") + channel permutation, FrEIA 0.2 compatible.

    For input ``x [B, C, *S]`` with passive half ``x1 = x[:, :C - C // 2]`` and active half
    ``x2 = x[:, C - C // 2:]``:

    ``a = subnet(concat(x1, *c))``, ``s = alpha * tanh(0.1 * a_s)``, ``t = 0.1 * a_t``,
    ``u = concat(x1, x2 * exp(s) + t)``, ``y[:, i] = (u * g + b)[:, perm[i]]`` with
    ``g = psi(global_scale)``. ``logdet = sum s + |S| * sum_c log g_c`` (nats, ``[B]``).

    The forward runs the subnet then ONE fused op (:func:`msflow_fast.ops.coupling_affine_permute`);
    the reverse runs :func:`~msflow_fast.ops.global_affine_permute` (reverse), the subnet, then
    :func:`~msflow_fast.ops.affine_coupling` (reverse). ``reverse_permutation`` adds one gather.
    ``gin_block``, ``permute_soft`` and ``learned_householder_permutation`` run on a plain-PyTorch
    path with FrEIA 0.2's semantics (slower, not fused).

    Args:
        dims_in: ``[(C, *S)]``: one input; ``S`` may be dummy ``(1, 1)`` (as in MSFlow): spatial
            sizes are not checked at run time, only the channel count.
        dims_c: condition shapes ``[(C_c, *S)]``; the conditions are concatenated to the passive half.
        subnet_constructor: ``f(c_in, c_out) -> nn.Module`` with ``c_in = C - C // 2 + sum C_c`` and
            ``c_out = 2 * (C // 2)`` (scale half, then shift half).
        affine_clamping: soft clamp ``alpha`` (MSFlow: 1.9).
        gin_block: volume-preserving GIN coupling (mean of ``s`` removed, no global scale).
        global_affine_init: initial global scale ``g``.
        global_affine_type: ``"SOFTPLUS"`` (``0.1 * softplus_{beta=0.5}``), ``"SIGMOID"`` or ``"EXP"``.
        permute_soft: random rotation from SO(C) instead of a hard permutation (needs scipy).
        learned_householder_permutation: number of learned Householder reflections (0 = off).
        reverse_permutation: apply the inverse permutation before the coupling (Putzky et al.).
        clamp_form: ``"tanh"`` = ``alpha * tanh(0.1 a)`` (FrEIA 0.2, MSFlow; default) or
            ``"tanh_scaled"`` = ``alpha * tanh(0.1 a / alpha)`` (FrEIA >= 2023-08). Weights trained
            with one form do not transfer to the other.
    """

    def __init__(
        self,
        dims_in: Sequence[Sequence[int]],
        dims_c: Sequence[Sequence[int]] | None = None,
        subnet_constructor: Callable[[int, int], nn.Module] | None = None,
        affine_clamping: float = 2.0,
        gin_block: bool = False,
        global_affine_init: float = 1.0,
        global_affine_type: str = "SOFTPLUS",
        permute_soft: bool = False,
        learned_householder_permutation: int = 0,
        reverse_permutation: bool = False,
        *,
        clamp_form: str = "tanh",
    ) -> None:
        super().__init__()
        dims_in = [tuple(int(d) for d in shape) for shape in dims_in]
        dims_c = [] if dims_c is None else [tuple(int(d) for d in shape) for shape in dims_c]
        if len(dims_in) != 1 or len(dims_in[0]) < 1:
            raise ValueError(f"dims_in must hold exactly one input shape (C, *spatial), got {dims_in}")
        if len(dims_in[0]) > 4:
            raise ValueError(f"dims_in {dims_in[0]} has {len(dims_in[0]) - 1} spatial dims; 0 to 3 are supported")
        channels = dims_in[0][0]
        if channels < 2:
            raise ValueError(f"AllInOneBlock needs at least 2 channels to split into halves, got dims_in={dims_in}")
        for shape in dims_c:
            if tuple(shape[1:]) != tuple(dims_in[0][1:]):
                raise ValueError(
                    f"dims_c {dims_c} must have the same non-channel dims as dims_in {dims_in} "
                    "(conditions are concatenated to the passive half along channels)"
                )
        if subnet_constructor is None:
            raise ValueError("subnet_constructor is required: a callable f(c_in, c_out) returning an nn.Module")
        if global_affine_type not in _GLOBAL_AFFINE_TYPES:
            raise ValueError(f"global_affine_type must be one of {_GLOBAL_AFFINE_TYPES}, got {global_affine_type!r}")
        if clamp_form not in _CLAMP_FORMS:
            raise ValueError(f"clamp_form must be one of {_CLAMP_FORMS}, got {clamp_form!r}")
        if isinstance(affine_clamping, bool) or not isinstance(affine_clamping, (int, float)) or not affine_clamping > 0:
            raise ValueError(f"affine_clamping must be a float > 0, got {affine_clamping!r}")
        householder = int(learned_householder_permutation)
        if householder < 0:
            raise ValueError(f"learned_householder_permutation must be >= 0, got {learned_householder_permutation}")

        self.dims_in = dims_in
        self.dims_c = dims_c
        self.in_channels = channels
        self.input_rank = len(dims_in[0]) - 1
        self.sum_dims = tuple(range(1, 2 + self.input_rank))
        self.condition_channels = sum(shape[0] for shape in dims_c)
        self.conditional = bool(dims_c)
        self.splits = [channels - channels // 2, channels // 2]
        self.clamp = float(affine_clamping)
        self.clamp_form = clamp_form
        self.global_affine_type = global_affine_type
        self.GIN = bool(gin_block)
        self.permute_soft = bool(permute_soft)
        self.householder = householder
        self.reverse_pre_permute = bool(reverse_permutation)

        # Same RNG consumption order as FrEIA 0.2: numpy permutation, torch householder vectors, subnet.
        gamma0 = ops.reference.global_scale_init(float(global_affine_init), global_affine_type)
        trailing = [1] * self.input_rank
        self.global_scale = nn.Parameter(torch.full((1, channels, *trailing), float(gamma0)))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, *trailing))

        if self.permute_soft:
            try:
                from scipy.stats import special_ortho_group
            except ImportError as exc:
                raise ImportError("permute_soft=True needs scipy (pip install scipy)") from exc
            w = torch.as_tensor(special_ortho_group.rvs(channels), dtype=torch.float32)
        else:
            w = compat.permutation_matrix(self.draw_permutation(channels), 0)

        if self.householder:
            self.vk_householder = nn.Parameter(0.2 * torch.randn(self.householder, channels))
            self.register_buffer("w_0", w)
            self.w_perm = None
            self.w_perm_inv = None
        else:
            self.register_buffer("w_perm", w.reshape(channels, channels, *trailing).clone())
            self.register_buffer("w_perm_inv", w.t().reshape(channels, channels, *trailing).clone())
        self._hard = not self.permute_soft and not self.householder
        if self._hard:
            perm = compat.permutation_index(self.w_perm)
            self.register_buffer("perm_index", perm, persistent=False)
            self.register_buffer("perm_index_inv", ops.reference.invert_permutation(perm), persistent=False)
        self._fused = self._hard and not self.GIN

        self.subnet = subnet_constructor(self.splits[0] + self.condition_channels, 2 * self.splits[1])
        if self.w_perm is not None:
            self.register_load_state_dict_pre_hook(compat.permutation_load_pre_hook)
            self.register_load_state_dict_post_hook(compat.permutation_load_post_hook)

    @staticmethod
    def draw_permutation(channels: int) -> torch.Tensor:
        """The hard permutation's indices ``[C]``, drawn as FrEIA 0.2 draws them
        (``np.random.permutation``, NumPy's global generator). A subclass standing in for another
        framework's block overrides it to draw as that framework does (same seed, same block)."""
        return torch.as_tensor(np.random.permutation(channels))

    # ------------------------------------------------------------------ state_dict compatibility

    def refresh_permutation(self) -> None:
        """Re-derive the gather indices from ``w_perm`` (called after ``load_state_dict``).

        Raises:
            ValueError: ``w_perm`` of a hard-permutation block is not a permutation matrix, or
                ``w_perm_inv`` is not its transpose.
        """
        if not self._hard:
            return
        perm = compat.permutation_index(self.w_perm, "w_perm")
        if not torch.equal(compat.permutation_index(self.w_perm_inv, "w_perm_inv"), ops.reference.invert_permutation(perm)):
            raise ValueError("w_perm_inv is not the inverse (transpose) of w_perm")
        self.perm_index = perm.to(self.w_perm.device)
        self.perm_index_inv = ops.reference.invert_permutation(self.perm_index)

    # ------------------------------------------------------------------ forward

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The block preserves shapes."""
        return input_dims

    def _input(self, x: object) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            t = x
        elif isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], torch.Tensor):
            t = x[0]
        else:
            raise TypeError(f"x must be a list or tuple holding one tensor [B, C, ...], got {type(x).__name__}")
        if t.dim() != 2 + self.input_rank or t.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, ...] with {self.input_rank} non-channel dims "
                f"(dims_in={self.dims_in}), got {tuple(t.shape)}"
            )
        return t

    def _conditions(self, c: object) -> list[torch.Tensor]:
        conds = [] if c is None else ([c] if isinstance(c, torch.Tensor) else list(c))
        if self.conditional and not conds:
            raise ValueError(f"this block was built with dims_c={self.dims_c} and needs its condition(s) in c")
        if not self.conditional and conds:
            raise ValueError("this block was built without dims_c but conditions were passed in c")
        return conds

    def _subnet(self, x1: torch.Tensor, conds: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        # A subnet with fast paths on (see nn.enable_fast_paths) takes the conditions
        # unconcatenated (SubnetConvLN.forward_split); any other gets FrEIA's ``concat(x1, *c)``.
        if conds and getattr(self.subnet, "fast_paths", False) and hasattr(self.subnet, "forward_split"):
            a = self.subnet.forward_split(x1, conds)
        else:
            a = self.subnet(torch.cat([x1, *conds], dim=1) if conds else x1)
        return a if a.dtype == dtype else a.to(dtype)

    def forward(
        self,
        x: Sequence[torch.Tensor],
        c: Sequence[torch.Tensor] | None = None,
        rev: bool = False,
        jac: bool = True,
    ) -> tuple[tuple[torch.Tensor], torch.Tensor]:
        """Run the block (``rev=False``) or its inverse (``rev=True``).

        Args:
            x: ``[x]`` or ``(x,)`` with ``x [B, C, *S]`` (a bare tensor is accepted too).
            c: conditions ``[c_1, ...]``, each ``[B, C_c, *S]``; required iff ``dims_c`` was given.
            rev: compute the inverse map.
            jac: accepted for the FrEIA contract; the log-det is always returned.

        Returns:
            ``((y,), logdet)``: ``y [B, C, *S]`` in x's dtype and ``logdet [B]`` in nats (negated for
            ``rev=True``); for float16/bfloat16 ``x`` (e.g. under autocast) the log-det is float32 and
            the float32 parameters ``global_scale``/``global_offset`` are used as they are, unrounded.
        """
        t = self._input(x)
        conds = self._conditions(c)
        if self._fused:
            y, logdet = self._reverse_fused(t, conds) if rev else self._forward_fused(t, conds)
        else:
            y, logdet = self._generic(t, conds, bool(rev))
        return (y,), logdet

    def _forward_fused(self, x: torch.Tensor, conds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reverse_pre_permute:
            x = torch.index_select(x, 1, self.perm_index_inv)
        a = self._subnet(x[:, : self.splits[0]], conds, x.dtype)
        y, logdet = ops.coupling_affine_permute(
            _to_4d(x),
            _to_4d(a),
            self.global_scale,
            self.global_offset,
            self.perm_index,
            clamp=self.clamp,
            clamp_form=self.clamp_form,
            affine_type=self.global_affine_type,
        )
        return y.reshape(x.shape), logdet

    def _reverse_fused(self, y: torch.Tensor, conds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        u, logdet_global = ops.global_affine_permute(
            _to_4d(y),
            self.global_scale,
            self.global_offset,
            self.perm_index,
            affine_type=self.global_affine_type,
            reverse=True,
        )
        u = u.reshape(y.shape)
        x1 = u[:, : self.splits[0]]
        a = self._subnet(x1, conds, y.dtype)
        x2, logdet_coupling = ops.affine_coupling(
            _to_4d(u[:, self.splits[0] :]), _to_4d(a), clamp=self.clamp, clamp_form=self.clamp_form, reverse=True
        )
        x = torch.cat([x1, x2.reshape(x1.shape[0], self.splits[1], *x1.shape[2:])], dim=1)
        if self.reverse_pre_permute:
            x = torch.index_select(x, 1, self.perm_index)
        return x, logdet_global + logdet_coupling

    # ------------------------------------------------------------------ plain-PyTorch path

    def mixing_matrix(self) -> torch.Tensor:
        """The ``[C, C]`` channel mixing matrix ``W`` (``y = W v``): permutation, rotation or Householder product."""
        if not self.householder:
            return self.w_perm.reshape(self.in_channels, self.in_channels)
        w = self.w_0
        eye = torch.eye(self.in_channels, dtype=w.dtype, device=w.device)
        for vk in self.vk_householder:
            w = w @ (eye - 2 * torch.outer(vk, vk) / torch.dot(vk, vk))
        return w

    def _mix(self, x: torch.Tensor, w: torch.Tensor | None, transpose: bool) -> torch.Tensor:
        if w is None:
            return torch.index_select(x, 1, self.perm_index_inv if transpose else self.perm_index)
        w = w.to(x.dtype)
        return torch.einsum("ij,bj...->bi...", w.t() if transpose else w, x)

    def _generic(self, x: torch.Tensor, conds: list[torch.Tensor], rev: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = None if self._hard else self.mixing_matrix()
        n_pixels = x[0, :1].numel()
        acc = ops.reference.compute_dtype(x.dtype)  # log-dets of half inputs in float32, as the fused path
        if self.GIN:
            scale = None
            logdet_global = x.new_zeros((), dtype=acc)
        else:
            g = ops.reference.global_scale_activation(self.global_scale, self.global_affine_type)
            scale = g.to(x.dtype)
            logdet_global = torch.log(g.to(acc)).sum()
        offset = self.global_offset.to(x.dtype)
        if rev:
            v = self._mix(x, w, transpose=True) - offset
            x = v if scale is None else v / scale
        elif self.reverse_pre_permute:
            x = self._mix(x, w, transpose=True)
        x1, x2 = x[:, : self.splits[0]], x[:, self.splits[0] :]
        a = self._subnet(x1, conds, x.dtype)
        s = ops.reference.soft_clamp(a[:, : self.splits[1]], self.clamp, self.clamp_form)
        if self.GIN:
            s = s - s.mean(dim=self.sum_dims, keepdim=True)
        shift = ops.reference.coupling_shift(a[:, self.splits[1] :], self.clamp_form)
        logdet = s.sum(dim=self.sum_dims, dtype=acc)
        if rev:
            x2 = (x2 - shift) * torch.exp(-s)
            out = torch.cat([x1, x2], dim=1)
            if self.reverse_pre_permute:
                out = self._mix(out, w, transpose=False)
            return out, -logdet - n_pixels * logdet_global
        u = torch.cat([x1, x2 * torch.exp(s) + shift], dim=1)
        v = (u if scale is None else u * scale) + offset
        return self._mix(v, w, transpose=False), logdet + n_pixels * logdet_global

    def extra_repr(self) -> str:
        options = [f"dims_in={self.dims_in}", f"dims_c={self.dims_c}", f"clamp={self.clamp}", f"clamp_form={self.clamp_form!r}"]
        options.append(f"global_affine_type={self.global_affine_type!r}")
        for name, value in (
            ("gin_block", self.GIN),
            ("permute_soft", self.permute_soft),
            ("learned_householder_permutation", self.householder),
            ("reverse_permutation", self.reverse_pre_permute),
        ):
            if value:
                options.append(f"{name}={value}")
        options.append(f"path={'fused' if self._fused else 'plain'}")
        return ", ".join(options)


FusedAllInOneBlock = AllInOneBlock

__all__ = ["AllInOneBlock", "FusedAllInOneBlock"]
