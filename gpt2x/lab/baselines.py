"""Published numbers a GPT-2 reproduction is compared with, each with its source. Torch-free.

Sources:

* build-nanogpt play.ipynb: the notebook of Karpathy's "Let's reproduce GPT-2 (124M)" lecture
  (https://github.com/karpathy/build-nanogpt, the log-plotting cell). It holds the OpenAI GPT-2
  124M checkpoint's validation loss on the lecture's FineWeb-Edu (sample-10BT) val shard and the
  HellaSwag acc_norm of the OpenAI GPT-2 checkpoints as the lecture's hellaswag.py measures them
  (zero-shot, the full 10,042-example val split, lowest mean ending loss wins).
* "Language Models are Few-Shot Learners" (Brown et al. 2020, the GPT-3 paper): HellaSwag
  zero-shot accuracy of GPT-3 Small/Medium/Large/XL (125M/350M/760M/1.3B, Table 2.1 for the
  shapes; the HellaSwag numbers are the ones the notebook copies). Each GPT-3 model sits beside
  the GPT-2 size nearest to it, as the notebook pairs them.

`gpt2x/assets/hellaswag_sample.jsonl` (the rehearsal's HellaSwag file) is a copy of
tests/data/hellaswag_tiny.jsonl: six hand-written examples in the official HellaSwag jsonl
format (https://github.com/rowanz/hellaswag, data/), not items of the released val split. It
exercises the HellaSwag code path; its accuracy means nothing and is never compared with the
numbers below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# OpenAI's GPT-2 124M checkpoint, val loss on the FineWeb-Edu val shard (play.ipynb
# `loss_baseline`). Only the 124M model was measured there.
GPT2_VAL_LOSS: dict[str, float] = {"124M": 3.2924}
# the data that loss was measured on: a run on other data gets no val-loss baseline
VAL_LOSS_DATA = "fineweb_edu"

# HellaSwag acc_norm of the OpenAI GPT-2 checkpoints (play.ipynb `hella2_baseline`)
GPT2_HELLASWAG: dict[str, float] = {
    "124M": 0.294463,
    "350M": 0.375224,
    "774M": 0.431986,
    "1558M": 0.488946,
}
# HellaSwag zero-shot accuracy of GPT-3 125M/350M/760M/1.3B from the GPT-3 paper, keyed by the
# GPT-2 size each is compared with (play.ipynb `hella3_baseline`)
GPT3_HELLASWAG: dict[str, float] = {
    "124M": 0.337,
    "350M": 0.436,
    "774M": 0.510,
    "1558M": 0.547,
}
# the GPT-3 model behind each key above (GPT-3 paper, Table 2.1)
GPT3_NAME: dict[str, str] = {
    "124M": "GPT-3 Small (125M)",
    "350M": "GPT-3 Medium (350M)",
    "774M": "GPT-3 Large (760M)",
    "1558M": "GPT-3 XL (1.3B)",
}

# (n_layer, n_embd) of the four GPT-2 sizes (the GPT-2 paper's Table 2; conf/model/gpt2*.yaml)
GPT2_SHAPES: dict[tuple[int, int], str] = {
    (12, 768): "124M",
    (24, 1024): "350M",
    (36, 1280): "774M",
    (48, 1600): "1558M",
}


def size_key(model: Mapping[str, Any] | None) -> str | None:
    """The GPT-2 size ("124M", "350M", "774M", "1558M") of a run's model config, or None.

    Only n_layer and n_embd decide: the padded vocab (50304) or a different context length do not
    change which published model a run is compared with."""
    if not model:
        return None
    try:
        shape = (int(model["n_layer"]), int(model["n_embd"]))
    except (KeyError, TypeError, ValueError):
        return None
    return GPT2_SHAPES.get(shape)


def val_loss_baseline(size: str | None, data_name: str | None) -> float | None:
    """The OpenAI checkpoint's val loss where it applies (its size, measured on this data)."""
    if size is None or data_name != VAL_LOSS_DATA:
        return None
    return GPT2_VAL_LOSS.get(size)


__all__ = [
    "GPT2_HELLASWAG",
    "GPT2_SHAPES",
    "GPT2_VAL_LOSS",
    "GPT3_HELLASWAG",
    "GPT3_NAME",
    "VAL_LOSS_DATA",
    "size_key",
    "val_loss_baseline",
]
