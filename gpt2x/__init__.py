"""gpt2x: Hydra-configured GPT-2 training with a measured optimization ladder."""

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
