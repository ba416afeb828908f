"""Functional fused ops with one contract and three backends (``reference``, ``triton``, ``cpp``).

``msflow_fast.ops.reference`` holds the maths; the functions here validate inputs and dispatch.

Mixed precision (the one statement of the policy; docs elsewhere point here):

- Every op computes float16/bfloat16 inputs in float32 (:func:`reference.compute_dtype`) and
  float32/float64 inputs in their own dtype. Element outputs keep the input dtype (rounded once);
  log-dets, the Gaussian NLL and log-likelihood maps of half inputs are float32; the aggregated
  anomaly maps and image scores keep the dtype of the log-likelihood maps they are given (float32
  in the models, since :func:`log_likelihood_map` returns float32).
- Per-channel parameters (global scale and offset, LayerNorm affine) may be float32 for half
  inputs (a model's parameters under autocast): they are used in float32 as given, never rounded
  to half, and their gradients come back in their own dtype.
- Under ``torch.autocast`` the models run their subnet convolutions in the autocast dtype and keep
  latents, log-dets and the loss in float32. AllInOneBlock's plain-PyTorch path (GIN, Householder
  or soft permutations) is the exception: it rounds the per-channel parameters to half for the
  element maths, as FrEIA does.
"""

from __future__ import annotations

from . import reference
from ._backend import BACKENDS, available_backends, requested_backend, use_backend
from ._validate import ENV_CHECK_FINITE, check_finite_enabled
from .conv import ENV_WINOGRAD, conv3x3, conv3x3_winograd_weight, winograd_enabled
from .coupling import affine_coupling, coupling_affine_permute, global_affine_permute
from .head import aggregate_anomaly_maps, gaussian_nll, log_likelihood_map, log_space_score
from .norm import channel_layer_norm_relu, sample_layer_norm

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
    "sample_layer_norm",
    "use_backend",
    "winograd_enabled",
]
