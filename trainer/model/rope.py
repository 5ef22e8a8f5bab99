"""3-axis rotary position embedding of Wan, as fp32 cos/sin tables.

The tables are plain tensors computed per forward from token positions; they are never
module buffers, so casting the model to bf16 cannot damage them (a complex buffer is
destroyed by such a cast). Positions may be fractional (ComfyUI's FramePack grids).
"""

from __future__ import annotations

import numpy as np
import torch


def rope_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """Split of the head dimension over (time, rows, columns), as Wan does."""
    return head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables for token positions, one column per head element.

    Args:
        positions: [S, 3] (time, row, column) positions, any float dtype.
        head_dim: attention head dimension D.

    Returns:
        (cos, sin), each [S, D] float32. Pair i of a head vector (elements 2i, 2i+1) is
        rotated by the angle a_i of column i of Wan's [S, D / 2] angle table: columns 2i and
        2i+1 of `cos` both hold cos(a_i), those of `sin` hold -sin(a_i) and +sin(a_i).
    """
    angles = []
    pos = positions.to(torch.float64)
    for axis, axis_dim in enumerate(rope_axes_dims(head_dim)):
        exponent = torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device) / axis_dim
        omega = 1.0 / (theta**exponent)
        angles.append(pos[:, axis, None] * omega[None, :])
    angle = torch.cat(angles, dim=1)
    cos, sin = torch.cos(angle).float(), torch.sin(angle).float()
    return cos.repeat_interleave(2, dim=1), torch.stack((-sin, sin), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` [B, S, H, D] by the [S, D] `rope_tables`, in fp32.

    ``x * cos + swap(x) * sin`` with each pair swapped: (x0 cos - x1 sin, x1 cos + x0 sin).
    One elementwise expression over whole heads, which compiles to a kernel about twice as
    fast as splitting the pairs and stacking them back (`bench/bench_norm_rope.py`).
    """
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return (xf * cos[None, :, None, :] + swapped * sin[None, :, None, :]).type_as(x)


def grid_positions(
    times: torch.Tensor | np.ndarray | list[float],
    rows: torch.Tensor | np.ndarray | list[float],
    cols: torch.Tensor | np.ndarray | list[float],
) -> torch.Tensor:
    """Positions [len(times) * len(rows) * len(cols), 3] of a frame-major, row-major grid."""
    t = torch.as_tensor(np.asarray(times, dtype=np.float64))
    h = torch.as_tensor(np.asarray(rows, dtype=np.float64))
    w = torch.as_tensor(np.asarray(cols, dtype=np.float64))
    grid = torch.stack(torch.meshgrid(t, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def video_positions(frames: int, height: int, width: int, t_start: float = 0.0) -> torch.Tensor:
    """Integer grid positions of `frames` x `height` x `width` tokens starting at `t_start`."""
    return grid_positions(np.arange(frames) + t_start, np.arange(height), np.arange(width))


def framepack_positions(
    lat_height: int, lat_width: int, bucket_grids: list[tuple[int, int, int]], numerics: str
) -> torch.Tensor:
    """Positions of the FramePack motion tokens (1x, 2x and 4x buckets, in that order).

    Args:
        lat_height, lat_width: latent size of the motion frames (before patching).
        bucket_grids: token grid (frames, rows, cols) produced by each bucket's conv.
        numerics: "official" (Wan2.2: times -1, -3, -19/-14/-9/-4, integer-truncated
            spatial positions) or "comfyui" (times -1, -3, -19..-16, fractional linspace
            spatial positions).
    """
    (_, h1, w1), (_, h2, w2), (t4, h4, w4) = bucket_grids
    if numerics == "official":
        half_h, half_w = lat_height // 2, lat_width // 2

        def spread(count: int, extent: int) -> np.ndarray:
            return np.linspace(0, extent - 1, count).astype(int)

        times_4x = -np.linspace(19, 4, t4).astype(int)
        parts = [
            grid_positions([-1], np.arange(h1), np.arange(w1)),
            grid_positions([-3], spread(h2, half_h), spread(w2, half_w)),
            grid_positions(times_4x, spread(h4, half_h), spread(w4, half_w)),
        ]
    elif numerics == "comfyui":
        len_h, len_w = (lat_height + 1) // 2, (lat_width + 1) // 2

        def spread(count: int, extent: int) -> np.ndarray:
            return np.linspace(0, extent - 1, count)

        parts = [
            grid_positions([-1], spread(len_h, len_h), spread(len_w, len_w)),
            grid_positions([-3], spread(h2, len_h), spread(w2, len_w)),
            grid_positions(np.linspace(-19, -19 + t4 - 1, t4), spread(h4, len_h), spread(w4, len_w)),
        ]
    else:
        raise ValueError(f"unknown numerics '{numerics}' (expected 'official' or 'comfyui')")
    return torch.cat(parts, dim=0)
