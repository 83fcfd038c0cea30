#!/usr/bin/env python3
"""PyTorch / HF transformers timings of the benchmarks that `cargo moe-inspect
bench` runs, on the same checkpoint, written in the same JSON shape
(bench.json, schema moe-inspect/bench/v1) so the report can show both side by
side (`cargo moe-inspect bench --peer torch.json`, or `--peer torch` to run
this script from the CLI).

    python benches/compare_torch.py [MODEL_DIR] [--out torch.json] [--tokens 1,256]
                                    [--device cpu] [--label mixtral-scaled] [--filter SUBSTR,...]

MODEL_DIR defaults to the scaled Mixtral model that `cargo bench --bench
forward` and `cargo moe-inspect bench` write
(target/moe-inspect-bench/mixtral-scaled-full). Benchmarks, with the names the
CLI uses:

- {dev}/routing/softmax-topk/e{E}-k{k}/n{N}: router matmul, softmax, top-k,
  renormalise (E, k, hidden = 8, 2, 4096; 64, 6, 2048; 256, 8, 7168);
- {dev}/routing/sigmoid-group/e256-k8/n{N}: DeepSeek-V3's group-limited
  sigmoid routing (8 groups, 4 kept, correction bias, renormalised, x 2.5);
- {dev}/moe-layer/topk/{label}/n{N}: the model's own MoE block on layer 0;
- {dev}/moe-layer/all-experts/{label}/n{N}: every expert on every token;
- {dev}/forward/prefill/{label}/n{N}: model(ids).logits (no KV cache);
- {dev}/forward/decode/{label}: a one-token forward pass (no KV cache).

Timing as in the Rust harness: one warm-up call, iterations batched to at
least 5 ms per sample, at least 5 samples within --time seconds (at most 30),
mean with a 95% t-interval; CUDA is synchronised before the clock stops.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df):
    if df <= 0:
        return float("inf")
    return T975[df - 1] if df <= 30 else 1.960 + 2.4 / df


def measure(fn, device, target_s):
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    fn()
    sync()
    first = max(time.perf_counter() - t0, 1e-7)
    iters = max(1, math.ceil(0.005 / first)) if first < 0.005 else 1
    n = min(30, max(5, int(target_s / (first * iters))))
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        samples.append((time.perf_counter() - t) / iters)
        if len(samples) >= 5 and time.perf_counter() - start > 2 * target_s:
            break
    return samples, iters


def result(name, group, variant, model, tokens, samples, iters):
    mean = statistics.fmean(samples)
    half = t975(len(samples) - 1) * statistics.stdev(samples) / math.sqrt(len(samples)) \
        if len(samples) > 1 else 0.0
    return {
        "name": name, "group": group, "variant": variant, "model": model, "tokens": tokens,
        "samples_s": samples, "iters_per_sample": iters, "mean_s": mean,
        "ci_low_s": max(mean - half, 0.0), "ci_high_s": mean + half,
        "tokens_per_s": tokens / mean, "flops": 0.0, "bytes": 0.0, "gflops": 0.0, "gbs": 0.0,
    }


def softmax_topk(x, w, k):
    p = torch.softmax(x @ w.T, dim=-1)
    weights, ids = torch.topk(p, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def sigmoid_group(x, w, bias, k, n_group=8, topk_group=4, scale=2.5):
    scores = torch.sigmoid(x @ w.T)
    biased = scores + bias
    t, e = biased.shape
    groups = biased.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.topk(groups, topk_group, dim=-1)[1]
    mask = torch.zeros_like(groups).scatter_(1, keep, 1.0)
    mask = mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    ids = torch.topk(biased.masked_fill(mask == 0, float("-inf")), k, dim=-1)[1]
    weights = scores.gather(1, ids)
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale, ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="target/moe-inspect-bench/mixtral-scaled-full")
    ap.add_argument("--out", help="write bench.json-shaped results here (else print them)")
    ap.add_argument("--tokens", default="256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", default="mixtral-scaled")
    ap.add_argument("--filter", default="")
    ap.add_argument("--time", type=float, default=1.5)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    import transformers

    dev = "cpu" if args.device == "cpu" else "cuda"
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    filters = [f for f in args.filter.split(",") if f]
    wanted = lambda name: not filters or any(f in name for f in filters)  # noqa: E731
    torch.manual_seed(0)
    results = []

    def bench(name, group, variant, model, n, fn):
        if not wanted(name):
            return
        with torch.inference_mode():
            samples, iters = measure(fn, args.device, args.time)
        results.append(result(name, group, variant, model, n, samples, iters))
        print(f"{name}: {statistics.fmean(samples) * 1e3:.3f} ms", file=sys.stderr)

    for e, k, h in [(8, 2, 4096), (64, 6, 2048), (256, 8, 7168)]:
        w = torch.randn(e, h, device=args.device) / math.sqrt(h)
        for n in tokens:
            x = torch.randn(n, h, device=args.device)
            bench(f"{dev}/routing/softmax-topk/e{e}-k{k}/n{n}", "routing", "softmax-topk",
                  f"e{e}-k{k}", n, lambda: softmax_topk(x, w, k))
            if e == 256:
                bias = torch.arange(e, device=args.device).remainder(11).float() * 0.01
                bench(f"{dev}/routing/sigmoid-group/e{e}-k{k}/n{n}", "routing", "sigmoid-group",
                      f"e{e}-k{k}", n, lambda: sigmoid_group(x, w, bias, k))

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa").eval().to(args.device)
    label = args.label
    moe = model.model.layers[0].mlp
    hidden = model.config.hidden_size
    vocab = model.config.vocab_size
    experts = getattr(moe, "experts", None)
    for n in tokens:
        x = torch.randn(1, n, hidden, device=args.device)
        bench(f"{dev}/moe-layer/topk/{label}/n{n}", "moe-layer", "topk", label, n, lambda: moe(x))
        if experts is not None and hasattr(experts, "gate_up_proj"):
            gate_up, down = experts.gate_up_proj, experts.down_proj  # [E, 2I, H], [E, H, I]
            inter = down.shape[-1]

            def all_experts():
                h = x[0]
                out = []
                for e in range(gate_up.shape[0]):
                    g, u = (h @ gate_up[e].T).split(inter, dim=-1)
                    out.append((torch.nn.functional.silu(g) * u) @ down[e].T)
                return torch.stack(out)

            bench(f"{dev}/moe-layer/all-experts/{label}/n{n}", "moe-layer", "all-experts", label, n,
                  all_experts)
    for n in tokens:
        ids = torch.tensor([[(i * 7919) % vocab for i in range(n)]], device=args.device)
        bench(f"{dev}/forward/prefill/{label}/n{n}", "forward", "prefill", label, n,
              lambda: model(ids, use_cache=False).logits)
    one = torch.tensor([[0]], device=args.device)
    bench(f"{dev}/forward/decode/{label}", "forward", "decode", label, 1,
          lambda: model(one, use_cache=False).logits)

    out = {
        "schema": "moe-inspect/bench/v1",
        "tool": f"torch {torch.__version__} / transformers {transformers.__version__}",
        "created_unix": int(time.time()),
        "device": dev,
        "machine": {"threads": torch.get_num_threads(), "arch": platform.machine(),
                    "os": sys.platform},
        "benchmarks": results,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)


if __name__ == "__main__":
    main()
