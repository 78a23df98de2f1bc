"""Sampling text from a model: the prompt primes state and memory in one pass, then one token at a time."""

from __future__ import annotations

import torch

from .model import SHARNN, State


@torch.no_grad()
def sample(
    model: SHARNN,
    prompt: bytes,
    length: int,
    temperature: float = 1.0,
    seed: int | None = None,
    state: State | None = None,
) -> tuple[bytes, State]:
    """Continue `prompt` by `length` bytes.

    The prompt (all but its last byte) runs as one segment; then each step feeds one token and reuses the
    returned state, so the past is never recomputed. Returns the new bytes and the state after them.
    """
    was_training = model.training
    model.eval()
    device = model.encoder.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    prompt = prompt or b"\n"
    ids = torch.tensor(list(prompt), dtype=torch.long, device=device).unsqueeze(1)  # (T, 1)
    if len(prompt) > 1:
        state = model(ids[:-1], state).state
    token = ids[-1:]
    out = bytearray()
    for _ in range(length):
        o = model(token, state)
        state = o.state
        logits = o.logits[-1, 0].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        token = torch.tensor([[nxt]], device=device)
    model.train(was_training)
    return bytes(out), state
