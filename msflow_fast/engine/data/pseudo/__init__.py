"""Parts of the pseudo-anomaly generator (:mod:`msflow_fast.engine.data.pseudo_anomaly` puts them together).

- :mod:`.draws`: seeded random draws (one CPU ``torch.Generator`` per image; small draws, moved to the device).
- :mod:`.perlin`: 2-D Perlin gradient noise, fBm, DRAEM's Perlin masks.
- :mod:`.geometry`: rotations, rotated-rectangle pastes, resizing.
- :mod:`.colour`: DRAEM's ten colour and geometry augmentations, in torch.
- :mod:`.textures`: the procedural texture bank and the CC0 textures of the scikit-image wheel.
- :mod:`.poisson`: a DST-based Poisson solver and seamless (Poisson) blending.
- :mod:`.priors`: foreground estimation and the per-category rotation and foreground rules.
- :mod:`.branches`: the anomaly branches (texture intrusion, CutPaste, scar, Poisson blend).
- :mod:`.config`: :class:`PseudoAnomalyConfig`, the one validated, frozen configuration.

Images everywhere are float ``[3, H, W]`` in [0, 1] on any device; masks are float ``[H, W]`` in {0, 1}.
"""
