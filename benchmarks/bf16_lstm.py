"""Does a bf16 LSTM learn like an fp32 one? A CPU emulation of what CUDA autocast does to the LSTM (issue #11).

    python benchmarks/bf16_lstm.py                            # every variant, 150 steps each (~25 min, 2 cores)
    python benchmarks/bf16_lstm.py --variants fp32 all --seeds 3

Under CUDA autocast, cuDNN runs the whole LSTM in the autocast dtype: its weights, input, gates, hidden and cell
state, and the gradients it carries back through time are bf16 numbers (products still accumulate in fp32). On
an H200, paper-width SHA-RNN training in bf16 stayed on the ~4.5 bpc plateau that fp32 leaves by step 100. A CPU
without native bf16 cannot run that kernel (sharnn keeps the LSTM in fp32 there), so this script emulates it in
fp32 arithmetic: values are rounded to bf16 where cuDNN stores them, and gradients where it carries them. Each
rounding can be switched on alone, to find the one that loses the signal.

The model isolates the core: byte embedding, one LSTM, a projection and the tied decoder, trained with Adam on the
python-stdlib corpus (built in, nothing downloaded), the same seeds and data order for every variant; validation
is the end of the train split, which no run reaches. Early training moves a lot with the seed (when a run leaves
the initial plateau), so compare a variant with fp32 over several `--seeds`, not one run with another. Prints a
Markdown table of train bpc every 50 steps and validation bpc.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sharnn.data import load_corpus


def to_bf16(x: Tensor) -> Tensor:
    """The nearest bf16 number, kept in fp32."""
    return x.to(torch.bfloat16).to(torch.float32)


class _Round(torch.autograd.Function):
    """Round the value, the gradient flowing back through it, or both, to bf16."""

    @staticmethod
    def forward(ctx, x: Tensor, value: bool, grad: bool) -> Tensor:
        ctx.grad = grad
        return to_bf16(x) if value else x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        return (to_bf16(g) if ctx.grad else g), None, None


# Where cuDNN keeps bf16 numbers. `operands`: weights and input; `gates`: the pre-activations; `state`: h and c
# from step to step. Each in the forward value (`v`) or the gradient carried back (`g`).
VARIANTS = {
    "fp32": {},
    "all": {"operands": "vg", "gates": "vg", "state": "vg"},
    "values only": {"operands": "v", "gates": "v", "state": "v"},
    "gradients only": {"operands": "g", "gates": "g", "state": "g"},
    "state only": {"state": "vg"},
    "operands and gates": {"operands": "vg", "gates": "vg"},
}


class EmulatedLSTM(nn.Module):
    """One LSTM layer as a loop over time, with bf16 rounding where `where` says (the same parameters and
    initialisation as nn.LSTM: with no rounding it computes what nn.LSTM computes)."""

    def __init__(self, E: int, H: int, where: dict[str, str]):
        super().__init__()
        self.lstm = nn.LSTM(E, H)
        self.where = where

    def r(self, place: str, x: Tensor) -> Tensor:
        how = self.where.get(place, "")
        return _Round.apply(x, "v" in how, "g" in how) if how else x

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        m = self.lstm
        w_ih, w_hh, x = self.r("operands", m.weight_ih_l0), self.r("operands", m.weight_hh_l0), self.r("operands", x)
        h, c = (self.r("state", s[0]) for s in state)
        xi = F.linear(x, w_ih, m.bias_ih_l0 + m.bias_hh_l0)
        outs = []
        for t in range(x.shape[0]):
            i, f, g, o = self.r("gates", xi[t] + h @ w_hh.t()).chunk(4, -1)
            c = self.r("state", torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g))
            h = self.r("state", torch.sigmoid(o) * torch.tanh(c))
            outs.append(h)
        return torch.stack(outs), (h[None], c[None])


class ByteLM(nn.Module):
    def __init__(self, E: int, H: int, where: dict[str, str] | None):
        super().__init__()
        self.emb = nn.Embedding(256, E)
        nn.init.uniform_(self.emb.weight, -0.1, 0.1)
        self.rnn = nn.LSTM(E, H) if where is None else EmulatedLSTM(E, H, where)
        self.proj = nn.Linear(H, E)
        self.dec = nn.Linear(E, 256)
        self.dec.weight = self.emb.weight  # tied, as SHA-RNN's

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        y, state = self.rnn(self.emb(x), state)
        return self.dec(self.proj(y)), state


def streams(ids: np.ndarray, batch: int) -> Tensor:
    n = len(ids) // batch
    return torch.from_numpy(ids[: n * batch].astype(np.int64)).view(batch, n).t().contiguous()


def run(name: str, seed: int, args: argparse.Namespace, train: Tensor, valid: Tensor) -> dict:
    torch.manual_seed(seed)
    where = VARIANTS[name]
    model = ByteLM(args.emsize, args.nhid, where or None)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    zero = lambda: (torch.zeros(1, args.batch, args.nhid), torch.zeros(1, args.batch, args.nhid))
    state, losses, marks, start = zero(), [], [], time.perf_counter()
    for step in range(args.steps):
        pos = step * args.bptt % (len(train) - args.bptt - 1)
        logits, state = model(train[pos : pos + args.bptt], state)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(logits.reshape(-1, 256), train[pos + 1 : pos + args.bptt + 1].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            marks.append(np.mean(losses[-50:]) / math.log(2))
            print(f"  {name}, seed {seed}: step {step + 1}, train bpc {marks[-1]:.3f}", flush=True)
    seconds = time.perf_counter() - start
    total, count, state = 0.0, 0, zero()
    with torch.no_grad():
        for pos in range(0, len(valid) - args.bptt - 1, args.bptt):
            logits, state = model(valid[pos : pos + args.bptt], state)
            target = valid[pos + 1 : pos + args.bptt + 1].reshape(-1)
            total += F.cross_entropy(logits.reshape(-1, 256), target, reduction="sum").item()
            count += target.numel()
    return {"name": name, "seed": seed, "marks": marks, "valid": total / count / math.log(2), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                    help=f"which runs (default: all of {', '.join(VARIANTS)})")
    ap.add_argument("--seeds", type=int, default=1, help="runs of each variant, seeds 0, 1, ... (default: 1)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--emsize", type=int, default=256)
    ap.add_argument("--nhid", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bptt", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--valid-bytes", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus = load_corpus("python-stdlib")
    held_out = len(corpus.train) - args.valid_bytes
    train, valid = streams(corpus.train[:held_out], args.batch), streams(corpus.train[held_out:], args.batch)
    rows = [run(name, seed, args, train, valid) for name in args.variants for seed in range(args.seeds)]
    marks = [f"step {50 * (i + 1)}" for i in range(args.steps // 50)]
    print(f"\nE {args.emsize}, H {args.nhid}, batch {args.batch}, bptt {args.bptt}, Adam lr {args.lr}, "
          f"{args.steps} steps; train bpc (mean of the last 50 steps) and validation bpc (the train split's last "
          f"{args.valid_bytes:,} bytes)\n")
    cols = ["variant", "bf16 where", "seed", *marks, "valid bpc", "seconds"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        where = ", ".join(f"{k} ({v})" for k, v in VARIANTS[r["name"]].items()) or "nowhere"
        cells = [r["name"], where, r["seed"], *(f"{m:.3f}" for m in r["marks"]), f"{r['valid']:.3f}",
                 f"{r['seconds']:.0f}"]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
