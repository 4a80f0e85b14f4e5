"""What the checkpoint tools (gpt2x.sample, gpt2x.export, gpt2x.evaluate) share: their Hydra
entry point shape and their one-line errors."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    """An expected problem: one line naming the fix on stderr, exit status 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)
