"""gpt2x: Hydra-configured GPT-2 training with a measured optimization ladder."""

from pathlib import Path

__version__ = "0.1.0"

# conf/ (Hydra config groups), experiments/ and sweeps/ sit beside the package in the repo
REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
