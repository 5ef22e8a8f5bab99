"""Aspect buckets at a pixel area (sides multiples of 16 px)."""

from __future__ import annotations

import math

from .config import DatasetConfig

MULTIPLE = 16


def target_area(config: DatasetConfig) -> float:
    """Bucket area in px: resolution^2 (pixel_area) or resolution megapixels (area), capped by
    maximum_image_size in the same unit."""
    def area(value: float) -> float:
        return value * value if config.resolution_type == "pixel_area" else value * 1_000_000

    result = area(config.resolution)
    if config.maximum_image_size:
        result = min(result, area(config.maximum_image_size))
    return result


def image_size(width: int, height: int, config: DatasetConfig) -> float:
    """A source's size in the unit of minimum_image_size: sqrt(w*h) px or megapixels."""
    return math.sqrt(width * height) if config.resolution_type == "pixel_area" else width * height / 1_000_000


def bucket_for(width: int, height: int, config: DatasetConfig) -> tuple[int, int]:
    """(h_px, w_px) of the bucket for a width x height source: aspect ratio rounded to
    `aspect_bucket_rounding` decimals, area about `target_area`, sides multiples of 16."""
    aspect = round(width / height, config.aspect_bucket_rounding) or 10 ** -config.aspect_bucket_rounding
    area = target_area(config)
    h = max(MULTIPLE, round(math.sqrt(area / aspect) / MULTIPLE) * MULTIPLE)
    w = max(MULTIPLE, round(h * aspect / MULTIPLE) * MULTIPLE)
    return h, w
