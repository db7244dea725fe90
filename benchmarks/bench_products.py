"""How fast a decoding step's products read their weights, per weight format, against the memory's speed.

    python benchmarks/bench_products.py [--threads N] [--rows 1,8] [--repeats 20]

For the Qwen2.5-0.5B shapes (attention, MLP, a quarter of the head) and 1 or 8 rows of activations:
GB/s of weight bytes read by torch's default float32 product, oneDNN's (float32 prefill, and decoding
where the kernel cannot be built), torch's bfloat16 product, and qwen2audio's kernel (generation/kernels)
on float32, bfloat16 and int8 weights, with the memory's own read
speed (``torch.sum`` over 1 GiB) measured in the same run. Best of --repeats. Cache-sized weights
(all but the head) may read faster than the memory when a repeat finds them still in cache.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_inference import best, read_bandwidth  # noqa: E402  (this folder)
from qwen2audio.generation import weights  # noqa: E402
from qwen2audio.generation.kernels import packed_linear_op  # noqa: E402

SHAPES = [(1152, 896, "qkv"), (896, 896, "o"), (9728, 896, "gate+up"), (896, 4864, "down"),
          (151936 // 4, 896, "head / 4")]


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm: the first call may allocate or fault pages in
    return best(fn, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    op = packed_linear_op()
    bandwidth = read_bandwidth()
    print(f"\n{platform.processor() or platform.machine()} | torch {torch.__version__} | {args.threads} threads | "
          f"memory read (torch.sum, 1 GiB): {bandwidth:.1f} GB/s | packed-weight kernel: {'built' if op else 'NOT built'}\n")
    print("| weight (out x in) | rows | float32 torch | float32 oneDNN | float32 qwen2audio | bfloat16 torch | "
          "bfloat16 qwen2audio | int8 qwen2audio |")
    print("|---|---|---|---|---|---|---|---|")
    for out_f, in_f, name in SHAPES:
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        fp32 = linear.weight.detach().contiguous()
        bf16 = fp32.bfloat16()
        onednn = weights.OneDNNLinear(linear) if weights.onednn_usable(torch.float32) else None
        f = weights.FP32Linear(linear)
        q = weights.Int8Linear(linear)
        b = weights.BF16Linear(torch.nn.Linear(in_f, out_f, bias=False).bfloat16())
        for rows in rows_list:
            x = torch.randn(rows, in_f)
            xb = x.bfloat16()
            cells = []
            with torch.inference_mode():
                for fn, nbytes in ((lambda: torch.nn.functional.linear(x, fp32), fp32.numel() * 4),
                                   (lambda: onednn(x), fp32.numel() * 4) if onednn else (None, 0),
                                   (lambda: f(x), fp32.numel() * 4),
                                   (lambda: torch.nn.functional.linear(xb, bf16), bf16.numel() * 2),
                                   (lambda: b(xb), bf16.numel() * 2),
                                   (lambda: q(x), q.stored.numel() + q.scale.numel() * 4)):
                    cells.append("-" if fn is None else f"{nbytes / best_seconds(fn, args.repeats) / 1e9:.1f}")
            print(f"| {out_f} x {in_f} ({name}) | {rows} | " + " | ".join(cells) + " |")
    print("\nGB/s of weight bytes read (higher is better); the memory reads at "
          f"{bandwidth:.1f} GB/s in this run.")


if __name__ == "__main__":
    main()
