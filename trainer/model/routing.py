"""TREAD token routing for S2V training.

A route lets a random subset of the noisy video tokens skip a contiguous range of blocks:
the dropped tokens carry their values from before the route to after it unchanged, the
kept ones (plus every reference, motion and text token, which are never dropped) go
through the blocks. Routes are active only in training with gradients on.

`selection_ratio` is the fraction of video tokens DROPPED inside the route (0.5 keeps half).
The same number of tokens is dropped in every latent frame, so the per-frame audio
injection still sees whole frames of equal size inside a route.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenRoute:
    """Blocks `start_layer_idx` ..= `end_layer_idx` (inclusive) see only the kept tokens."""

    selection_ratio: float
    start_layer_idx: int
    end_layer_idx: int


def parse_routes(routes: Mapping[str, Any] | Iterable[Mapping[str, Any] | TokenRoute] | None,
                 num_layers: int) -> list[TokenRoute]:
    """Normalise a routes config (SimpleTuner's `{"routes": [...]}` or a plain list) to sorted
    routes with non-negative block indices; negative indices count from the last block."""
    if routes is None:
        return []
    if isinstance(routes, Mapping):
        routes = routes.get("routes", [])
    parsed = []
    for route in routes:
        if not isinstance(route, TokenRoute):
            route = TokenRoute(float(route["selection_ratio"]), int(route["start_layer_idx"]),
                               int(route["end_layer_idx"]))
        start = route.start_layer_idx % num_layers if route.start_layer_idx < 0 else route.start_layer_idx
        end = route.end_layer_idx % num_layers if route.end_layer_idx < 0 else route.end_layer_idx
        if not 0 <= start <= end < num_layers:
            raise ValueError(f"route blocks {route.start_layer_idx}..{route.end_layer_idx} do not fit "
                             f"{num_layers} blocks (need 0 <= start <= end < {num_layers})")
        if not 0.0 <= route.selection_ratio < 1.0:
            raise ValueError(f"selection_ratio is the fraction of tokens dropped and must be in [0, 1), "
                             f"got {route.selection_ratio}")
        parsed.append(TokenRoute(route.selection_ratio, start, end))
    parsed.sort(key=lambda r: r.start_layer_idx)
    for before, after in itertools.pairwise(parsed):
        if after.start_layer_idx <= before.end_layer_idx:
            raise ValueError(f"routes overlap: {before} and {after}")
    return parsed


def kept_video_tokens(frames: int, tokens_per_frame: int, selection_ratio: float,
                      device: torch.device | str) -> torch.Tensor:
    """Indices [frames * keep] of the video tokens kept in a route, sorted (frame-major).

    Every frame keeps `keep = max(1, round((1 - selection_ratio) * tokens_per_frame))` tokens
    chosen uniformly at random (torch's default generator, so seeding makes it repeatable).
    """
    keep = max(1, round((1.0 - selection_ratio) * tokens_per_frame))
    scores = torch.rand(frames, tokens_per_frame, device=device)
    chosen = scores.topk(keep, dim=1).indices.sort(dim=1).values
    offsets = torch.arange(frames, device=device)[:, None] * tokens_per_frame
    return (chosen + offsets).flatten()
