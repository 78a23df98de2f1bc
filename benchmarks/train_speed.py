"""Training throughput (chars/s) of SHA-RNN configurations on this machine: forward, backward, LAMB step.

    python benchmarks/train_speed.py                 # paper and small configurations, 3 timed steps each
    python benchmarks/train_speed.py --steps 5 --configs small

Each step runs a (bptt, batch) segment with state and memory carried from the previous step, as training
does (memory fills up to the span). The first step is a warm-up and is not timed; the table reports the median.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from sharnn.config import SHARNNConfig
from sharnn.model import SHARNN, count_parameters, detach_state
from sharnn.optim import Lamb

CONFIGS = {
    # name: (model config, bptt, batch)
    "paper": (SHARNNConfig(), 1024, 16),
    "small": (SHARNNConfig(emsize=256, nhid=1024), 256, 16),
    "tiny": (SHARNNConfig(emsize=128, nhid=512, attn_span=256), 128, 16),
}


def time_training(cfg: SHARNNConfig, bptt: int, batch: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = SHARNN(cfg).train()
    opt = Lamb(model.parameters(), lr=1e-3, weight_decay=1.2e-6)
    state = None
    times = []
    for i in range(steps + 1):
        x = torch.randint(0, cfg.vocab_size, (bptt + 1, batch))
        t0 = time.perf_counter()
        out = model(x[:-1], state, targets=x[1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state = detach_state(out.state)
        if i:  # the first step allocates and warms up
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["paper", "small"], choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| config | params | bptt x batch | s/step (median of {args.steps}) | train chars/s | peak RSS GB (process, so far) |")
    print("|---|---|---|---|---|---|")
    for name in args.configs:
        cfg, bptt, batch = CONFIGS[name]
        times = time_training(cfg, bptt, batch, args.steps)
        med = statistics.median(times)
        rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        n = count_parameters(SHARNN(cfg))
        print(f"| {name} | {n / 1e6:.2f}M | {bptt} x {batch} | {med:.2f} | {bptt * batch / med:,.0f} | {rss_gb:.1f} |")


if __name__ == "__main__":
    main()
