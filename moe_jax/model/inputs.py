"""Host-side checks of the model's text inputs, before anything is computed.

Under jit the ids are tracers and only the shapes can be checked; called eagerly (generate,
evaluation on host arrays, the Hugging Face path) the ids are checked too: an id past the
vocabulary would give NaN logits and a negative one would silently wrap around.
"""

from __future__ import annotations

import jax
import numpy as np

_TRACED = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError)


def check_ids(tokens, vocab_size: int, what: str = "token ids") -> None:
    """ValueError unless every concrete id of `tokens` lies in [0, vocab_size)."""
    try:
        if not getattr(tokens, "is_fully_addressable", True):
            return  # a global array spread over hosts: each host checks its own data
        ids = np.asarray(tokens)
    except _TRACED:
        return  # traced: checked by the data pipeline instead
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{what} must lie in [0, {vocab_size}) (ModelConfig.vocab_size), got ids from "
            f"{int(ids.min())} to {int(ids.max())}"
        )


def check_text(tokens, max_len: int, vocab_size: int) -> None:
    """Text tokens [B, L]: 1 <= L <= max_len, and concrete ids inside the vocabulary."""
    n = tokens.shape[1]
    if n < 1:
        raise ValueError("text length 0: every row needs at least one token")
    if n > max_len:
        raise ValueError(f"text length {n} exceeds ModelConfig.max_len={max_len}")
    check_ids(tokens, vocab_size)


def static_int(value) -> int | None:
    """`value` as a Python int when it is known on the host (int, numpy integer, 0-d array);
    None when it is traced."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    try:
        return int(np.asarray(value))
    except (*_TRACED, TypeError):
        return None
