"""How the layout of a frozen weight and its bias change the speed of the 14B linears
(832x480x81: 34,320 tokens), forward (x W^T + b) and input gradient (dy W), in bf16.

    python bench/bench_linear_layout.py

"row" is the nn.Linear layout ([out, in] contiguous), "col" the same weight stored
transposed ([in, out] contiguous, seen as [out, in]); "bias" adds the bias in the matmul
(addmm), "no bias" runs the plain mm, "mm then bias add" adds the bias in a second kernel
(where a compiled graph would fuse it into the next elementwise one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from common import environment, print_table, save_json, time_cuda


def main() -> None:
    env = environment()
    tokens = 34320
    rows = []
    for name, n_in, n_out in (("attention 5120->5120", 5120, 5120), ("ffn up 5120->13824", 5120, 13824),
                              ("ffn down 13824->5120", 13824, 5120)):
        x = torch.randn(tokens, n_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, n_out, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n_out, device="cuda", dtype=torch.bfloat16)
        weight_row = torch.randn(n_out, n_in, device="cuda", dtype=torch.bfloat16) * 0.02
        weight_col = weight_row.t().contiguous().t()
        flop = 2 * tokens * n_in * n_out
        for layout, weight in (("row", weight_row), ("col", weight_col)):
            cases = {
                "forward, bias": lambda w=weight, x=x, bias=bias: F.linear(x, w, bias),
                "forward, no bias": lambda w=weight, x=x: F.linear(x, w),
                "forward, mm then bias add": lambda w=weight, x=x, bias=bias: F.linear(x, w).add_(bias),
                "input grad": lambda w=weight, dy=dy: dy @ w,
            }
            for case, fn in cases.items():
                median, _ = time_cuda(fn, 20, 30)
                rows.append({"linear": name, "weight": layout, "case": case, "ms": f"{median * 1e3:.2f}",
                             "TFLOP/s": f"{flop / median / 1e12:.0f}"})
                print(rows[-1], flush=True)
    title = f"bf16 linears at 34,320 tokens - {env['device']}, torch {env['torch']}, {env['date']}, commit {env['commit']}"
    table = print_table(title, rows, ["linear", "weight", "case", "ms", "TFLOP/s"])
    save_json("bench_linear_layout.json", {"env": env, "rows": rows, "table": table})


if __name__ == "__main__":
    main()
