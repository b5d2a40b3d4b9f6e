"""Image conditions for drifting camera streams: brightness, contrast, blur, noise, fog.

Each works on a float tensor [N, 3, H, W] in 0..255 and is deterministic given a generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONDITIONS = ("brightness", "contrast", "blur", "noise", "fog")


def brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Shift by delta (fraction of full scale, negative = darker)."""
    return x + 255.0 * delta


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale around each image's mean (factor < 1 flattens)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation sigma (pixels)."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def noise(x: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Additive Gaussian sensor noise, sigma as a fraction of full scale."""
    return x + 255.0 * sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype)


def fog(x: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """Blend toward a bright haze whose thickness varies smoothly over the image."""
    n, _, h, w = x.shape
    field = torch.rand((n, 1, 4, 4), generator=gen, dtype=x.dtype)
    field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    alpha = density * (0.6 + 0.4 * field)
    return x * (1 - alpha) + 220.0 * alpha


def apply(images_uint8: torch.Tensor, settings: dict[str, float], gen: torch.Generator) -> torch.Tensor:
    """Apply the named conditions (in a fixed physical order) to uint8 images [N, 3, H, W]."""
    unknown = set(settings) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown image conditions {sorted(unknown)}; known: {', '.join(CONDITIONS)}")
    x = images_uint8.float()
    if settings.get("fog"):
        x = fog(x, settings["fog"], gen)
    if settings.get("blur"):
        x = blur(x, settings["blur"])
    if "contrast" in settings:
        x = contrast(x, settings["contrast"])
    if settings.get("brightness"):
        x = brightness(x, settings["brightness"])
    if settings.get("noise"):
        x = noise(x, settings["noise"], gen)
    return x.round().clamp(0, 255).to(torch.uint8)
