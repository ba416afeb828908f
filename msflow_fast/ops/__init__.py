"""Functional fused ops with one contract and three backends (``reference``, ``triton``, ``cpp``).

``msflow_fast.ops.reference`` holds the maths; the functions here validate inputs and dispatch.
"""

from __future__ import annotations

from . import reference
from ._backend import BACKENDS, available_backends, requested_backend, use_backend
from ._validate import ENV_CHECK_FINITE, check_finite_enabled
from .conv import ENV_WINOGRAD, conv3x3, conv3x3_winograd_weight, winograd_enabled
from .coupling import affine_coupling, coupling_affine_permute, global_affine_permute
from .head import aggregate_anomaly_maps, gaussian_nll, log_likelihood_map, log_space_score
from .norm import channel_layer_norm_relu

__all__ = [
    "BACKENDS",
    "ENV_CHECK_FINITE",
    "ENV_WINOGRAD",
    "affine_coupling",
    "aggregate_anomaly_maps",
    "available_backends",
    "channel_layer_norm_relu",
    "check_finite_enabled",
    "conv3x3",
    "conv3x3_winograd_weight",
    "coupling_affine_permute",
    "gaussian_nll",
    "global_affine_permute",
    "log_likelihood_map",
    "log_space_score",
    "reference",
    "requested_backend",
    "use_backend",
    "winograd_enabled",
]
