"""The host RNG states (torch, numpy, python) as plain lists and tensors, so a checkpoint holding them
still loads with ``torch.load(weights_only=True)``; restoring them makes a resumed run draw what an
uninterrupted run would have drawn."""

from __future__ import annotations

import random

import numpy as np
import torch


def get_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }


def set_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
