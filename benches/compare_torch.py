#!/usr/bin/env python3
"""PyTorch/transformers timings on the synthetic model that
`cargo bench --bench forward` writes (target/moe-inspect-bench/mixtral-scaled-full),
for the same measurements: one MoE block on 256 tokens (top-k, and all experts
evaluated on every token) and a 256-token prefill. Prints a JSON object.

    python benches/compare_torch.py [MODEL_DIR]
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

TOKENS = 256


def best(fn, repeat=5):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "target/moe-inspect-bench/mixtral-scaled-full"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    moe = model.model.layers[0].mlp
    x = torch.randn(1, TOKENS, model.config.hidden_size)
    ids = torch.tensor([[(i * 7919) % 32000 for i in range(TOKENS)]])
    gate_up = moe.experts.gate_up_proj  # [E, 2I, H]
    down = moe.experts.down_proj  # [E, H, I]
    inter = down.shape[-1]

    def all_experts():
        h = x[0]
        outs = []
        for e in range(gate_up.shape[0]):
            g, u = (h @ gate_up[e].T).split(inter, dim=-1)
            outs.append((torch.nn.functional.silu(g) * u) @ down[e].T)
        return torch.stack(outs)

    with torch.inference_mode():
        topk = best(lambda: moe(x))
        allx = best(all_experts)
        prefill = best(lambda: model(ids).logits, repeat=3)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "moe_layer_topk_256_s": topk,
        "moe_layer_all_experts_256_s": allx,
        "prefill_256_s": prefill,
        "prefill_tokens_per_s": TOKENS / prefill[0],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
