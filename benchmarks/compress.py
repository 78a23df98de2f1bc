"""Compressed size and speed of `sharnn compress` next to gzip, bzip2, xz, zstd and zpaq, on a held-out text.

    sharnn train --preset tiny --max-time 600 --save runs/tiny10        # a model of Python source, 10 minutes
    python benchmarks/compress.py --checkpoint runs/tiny10 > benchmarks/compress.md

Held-out texts (`--files`, default both): `after`, the first 200,000 bytes of the standard-library modules that no
split of the `python-stdlib` corpus reads (`sharnn.data.python_stdlib_unused`, in the corpus's own file order):
ordinary Python modules that training never saw; and `test`, the corpus's test split (200,000 bytes of modules drawn
across the library, also never trained on). Any other name is read as a file. Rows:

    gzip -9, bzip2 -9, xz -9, zstd -19, zpaq -m5   the usual tools (a tool that is not installed is said so)
    sharnn, conditional       the checkpoint as trained: `sharnn compress CKPT IN OUT`
    sharnn, --adapt           the checkpoint, learning while it codes: `... --adapt`
    sharnn, fresh + --adapt   no training at all: `sharnn compress --fresh tiny --adapt IN OUT` (first file only)

Each sharnn row compresses and decompresses (checked byte for byte) in this process, timed without model loading,
with --streams (default 32) and 1 torch thread. A second table shows throughput against the number of streams:
the same number of steps (one byte per stream per step) for 1 to 48 streams.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/machine.py (a script's folder is on its path)

from sharnn.checkpoint import load_model
from sharnn.compress import (
    MIN_STREAM_BYTES,
    CoderSettings,
    adapt_config,
    compress_file,
    decompress_file,
    fresh_model,
)
from sharnn.data import load_corpus, python_stdlib_unused

TOOLS = [  # name, compress command, decompress command, output suffix
    ("gzip -9", ["gzip", "-9", "-k", "-f"], ["gzip", "-d", "-k", "-f"], ".gz"),
    ("bzip2 -9", ["bzip2", "-9", "-k", "-f"], ["bzip2", "-d", "-k", "-f"], ".bz2"),
    ("xz -9", ["xz", "-9", "-k", "-f"], ["xz", "-d", "-k", "-f"], ".xz"),
    ("zstd -19", ["zstd", "-19", "-q", "-k", "-f"], ["zstd", "-d", "-q", "-k", "-f"], ".zst"),
]




def heldout_python(limit: int = 200_000) -> bytes:
    """Standard-library sources that no split of the python-stdlib corpus reads (in the corpus's file order)."""
    out = bytearray()
    for p in python_stdlib_unused():
        out += p.read_bytes()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def tool_row(name: str, comp: list[str], decomp: list[str], suffix: str, src: Path, tmp: Path) -> str:
    if shutil.which(comp[0]) is None:
        return f"| {name} | not installed | | | |"
    f = tmp / src.name
    shutil.copyfile(src, f)
    t_c = timed(comp + [str(f)])
    packed = Path(str(f) + suffix)
    size = packed.stat().st_size
    f.unlink()
    t_d = timed(decomp + [str(packed)])
    assert f.read_bytes() == src.read_bytes(), name
    packed.unlink()
    return row(name, size, src.stat().st_size, t_c, t_d)


def zpaq_row(src: Path, tmp: Path) -> str:
    if shutil.which("zpaq") is None:
        return "| zpaq -m5 | not installed | | | |"
    arch, out = tmp / "a.zpaq", tmp / "zpaq-out"
    t_c = timed(["zpaq", "a", str(arch), str(src), "-m5"])
    t_d = timed(["zpaq", "x", str(arch), str(src), "-to", str(out)])
    assert out.read_bytes() == src.read_bytes()
    size = arch.stat().st_size
    arch.unlink()
    out.unlink()
    return row("zpaq -m5", size, src.stat().st_size, t_c, t_d)


def row(name: str, size: int, length: int, t_c: float, t_d: float, note: str = "") -> str:
    return (f"| {name} | {size:,} | {8 * size / length:.3f} | {length / 1024 / t_c:,.1f} | "
            f"{length / 1024 / t_d:,.1f} |{note}")


def sharnn_row(name: str, model, src: Path, tmp: Path, settings: CoderSettings, fresh=None) -> str:
    packed, back = tmp / "x.shz", tmp / "x.back"
    c = compress_file(model, src, packed, settings, fresh=fresh, overwrite=True)
    d = decompress_file(packed, back, None if fresh else model, overwrite=True)
    assert back.read_bytes() == src.read_bytes()
    return row(name, c.compressed, c.length, c.seconds, d.seconds,
               f" model cross-entropy {c.model_bits / c.length:.3f} bits/byte, {c.streams} streams")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a model trained on text of the same kind")
    ap.add_argument("--files", nargs="*", default=["after", "test"],
                    help="held-out texts: after, test (see above) or file paths (default: after test; none: only "
                         "the streams table, on `after`)")
    ap.add_argument("--streams", type=int, default=32, help="--streams for the sharnn rows (default: 32)")
    ap.add_argument("--fresh", default="tiny", help="preset of the fresh --adapt row (default: tiny)")
    ap.add_argument("--scaling-steps", type=int, default=4096,
                    help="steps per run of the streams table (0: no such table; default: 4096)")
    args = ap.parse_args()
    if 0 < args.scaling_steps < MIN_STREAM_BYTES:
        ap.error(f"--scaling-steps must be 0 or at least {MIN_STREAM_BYTES} (the coder's shortest stream)")
    torch.set_num_threads(1)
    model = load_model(args.checkpoint, "cpu")
    print("# Compression: `sharnn compress` next to the usual tools\n")
    print(f"Machine: {platform.machine()} {cpu_name()} (torch's CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} torch thread, torch "
          f"{torch.__version__}, Python {platform.python_version()}. Command: `python benchmarks/compress.py "
          f"{' '.join(sys.argv[1:])}`. Model: `{args.checkpoint}`. Speeds are KB/s of the original "
          "(1 KB = 1024 bytes), model loading excluded; every round trip is checked byte for byte.\n")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        sources = []
        (tmp / "in").mkdir()
        for name in args.files:
            src = tmp / "in" / f"{name}.py"
            if name == "after":
                src.write_bytes(heldout_python())
            elif name == "test":
                src.write_bytes(load_corpus("python-stdlib").test.tobytes())
            else:
                src = Path(name)
            sources.append((name, src))
            print(f"## {name} ({src.stat().st_size:,} bytes)\n")
            print("| compressor | bytes | bits/byte | compress KB/s | decompress KB/s | |")
            print("|---|---|---|---|---|---|")
            for tool, comp, decomp, suffix in TOOLS:
                print(tool_row(tool, comp, decomp, suffix, src, tmp), flush=True)
            print(zpaq_row(src, tmp), flush=True)
            print(sharnn_row("sharnn, conditional", model, src, tmp, CoderSettings(streams=args.streams)), flush=True)
            print(sharnn_row("sharnn, --adapt", model, src, tmp,
                             CoderSettings(streams=args.streams, adapt=adapt_config(False))), flush=True)
            if len(sources) == 1:  # the first file only: it is slow, and learning from nothing needs more text
                fresh, info = fresh_model(args.fresh)
                print(sharnn_row(f"sharnn, --fresh {args.fresh} --adapt", fresh, src, tmp,
                                 CoderSettings(streams=args.streams, adapt=adapt_config(True)), fresh=info), flush=True)
            print()
        if args.scaling_steps:
            if not sources:
                (tmp / "in" / "after.py").write_bytes(heldout_python())
                sources.append(("after", tmp / "in" / "after.py"))
            name, src = sources[0]
            print(f"## Throughput against streams (conditional, {args.scaling_steps:,} steps each, {name})\n")
            print("| streams | bytes coded | compress KB/s | decompress KB/s |")
            print("|---|---|---|---|")
            data = src.read_bytes()
            for streams in (1, 4, 16, 48):
                part = tmp / "part"
                need = streams * args.scaling_steps
                part.write_bytes((data * (1 + need // len(data)))[:need])
                c = compress_file(model, part, tmp / "p.shz", CoderSettings(streams=streams), overwrite=True)
                d = decompress_file(tmp / "p.shz", tmp / "p.back", model, overwrite=True)
                assert c.streams == streams, (c.streams, streams)
                print(f"| {streams} | {need:,} | {c.kb_per_s:,.1f} | {d.kb_per_s:,.1f} |", flush=True)


if __name__ == "__main__":
    main()
