"""Conversions between the two storages of hard channel permutations in FrEIA checkpoints.

FrEIA 0.2 (the version MSFlow ran on) stores an AllInOneBlock permutation as float 0/1 matrices
``w_perm``/``w_perm_inv`` of shape ``[C, C, 1, ..., 1]`` and applies them as 1x1 convolutions;
FrEIA >= 2023-06 stores int64 index vectors ``[C]`` of the same names. Both mean
``y[:, i] = x[:, perm[i]]``: matrix row ``i`` holds its single 1 at column ``perm[i]``, so
``perm = argmax(W[:, :, 0, 0], dim=1)`` and ``perm_inv = argsort(perm)``.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch


def permutation_matrix(perm: torch.Tensor, rank: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0/1 matrix ``[C, C, *([1] * rank)]`` whose row ``i`` has its 1 at column ``perm[i]``."""
    perm = perm.reshape(-1).long()
    channels = perm.numel()
    matrix = torch.zeros(channels, channels, dtype=dtype, device=perm.device)
    matrix[torch.arange(channels, device=perm.device), perm] = 1
    return matrix.view(channels, channels, *([1] * rank))


def permutation_index(matrix: torch.Tensor, name: str = "w_perm") -> torch.Tensor:
    """int64 ``[C]`` index of a 0/1 permutation matrix ``[C, C, 1, ...]`` (the inverse of :func:`permutation_matrix`).

    Raises:
        ValueError: ``matrix`` is not square in its first two dims or not a permutation matrix
            (e.g. a soft rotation from ``permute_soft=True``).
    """
    if matrix.dim() < 2 or matrix.shape[0] != matrix.shape[1] or any(s != 1 for s in matrix.shape[2:]):
        raise ValueError(f"{name} must be a [C, C, 1, ...] permutation matrix, got shape {tuple(matrix.shape)}")
    square = matrix.reshape(matrix.shape[0], matrix.shape[1]).detach()
    perm = square.argmax(dim=1)
    if not torch.equal(square, permutation_matrix(perm, 0, square.dtype)):
        raise ValueError(
            f"{name} is not a 0/1 permutation matrix (each row and column must hold exactly one 1); a soft "
            "(rotation) matrix needs a block built with permute_soft=True"
        )
    return perm.to(torch.int64)


def is_index_form(value: object) -> bool:
    """Whether ``value`` is a permutation in the newer FrEIA index form (int64 ``[C]``)."""
    return isinstance(value, torch.Tensor) and value.dim() == 1 and not value.is_floating_point()


def _check_index(index: torch.Tensor, channels: int, key: str) -> torch.Tensor:
    index = index.long()
    if index.numel() != channels:
        raise ValueError(f"{key} holds a permutation of {index.numel()} channels but the block has {channels}")
    if not torch.equal(torch.sort(index.cpu()).values, torch.arange(channels)):
        raise ValueError(f"{key} is not a permutation of 0..{channels - 1}")
    return index


def convert_permutation_entries(
    state_dict: MutableMapping[str, torch.Tensor],
    prefix: str,
    channels: int,
    rank: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Rewrite index-form ``{prefix}w_perm`` / ``{prefix}w_perm_inv`` entries of ``state_dict`` as matrices, in place.

    Matrix-form entries are left untouched. When only one of the two keys is present in index
    form, the other is not invented (``load_state_dict`` reports it as missing as usual).
    """
    for name in ("w_perm", "w_perm_inv"):
        key = prefix + name
        value = state_dict.get(key)
        if is_index_form(value):
            index = _check_index(value, channels, key)
            state_dict[key] = permutation_matrix(index, rank, dtype)


def permutation_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """``load_state_dict`` pre-hook of :class:`~msflow_fast.nn.AllInOneBlock`: accept and check permutations.

    Converts index-form ``w_perm``/``w_perm_inv`` entries to FrEIA 0.2 matrices, then, for a
    hard-permutation block, checks that ``w_perm`` is a permutation matrix and ``w_perm_inv`` its
    inverse BEFORE anything is copied, so a rejected load leaves the block untouched.

    Raises:
        ValueError: an entry is not a permutation of the block's channels, or the two disagree.
    """
    target = getattr(module, "w_perm", None)
    if target is None:
        return
    convert_permutation_entries(state_dict, prefix, module.in_channels, module.input_rank, dtype=target.dtype)
    if module.permute_soft:
        return
    w_perm, w_perm_inv = state_dict.get(prefix + "w_perm"), state_dict.get(prefix + "w_perm_inv")
    if not isinstance(w_perm, torch.Tensor) or w_perm.shape != target.shape:
        return  # missing or mis-shaped: load_state_dict reports it
    perm = permutation_index(w_perm, prefix + "w_perm")
    if isinstance(w_perm_inv, torch.Tensor) and w_perm_inv.shape == target.shape:
        inverse = permutation_index(w_perm_inv, prefix + "w_perm_inv")
        if not torch.equal(inverse.cpu(), torch.argsort(perm).cpu()):
            raise ValueError(f"{prefix}w_perm_inv is not the inverse (transpose) of {prefix}w_perm")


def permutation_load_post_hook(module, incompatible_keys) -> None:
    """``load_state_dict`` post-hook of :class:`~msflow_fast.nn.AllInOneBlock`: re-derive its gather indices."""
    module.refresh_permutation()


__all__ = [
    "convert_permutation_entries",
    "is_index_form",
    "permutation_index",
    "permutation_load_post_hook",
    "permutation_load_pre_hook",
    "permutation_matrix",
]
