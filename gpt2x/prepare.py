"""Prepare a corpus into token shards: `python -m gpt2x.prepare data=fineweb_edu`.

Works for any `data=...` choice (`data=hf data.source=/path/x.jsonl`, `data=text
data.source='/books/*.txt'`, ...). Interrupted? Run the same command again: finished shards are
kept and the source resumes after the documents they consumed. Writes nothing but `data.dir`
(no Hydra output folder, no log file).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from gpt2x import CONF_DIR
from gpt2x.config import register_configs

# keep Hydra from creating a run folder, a .hydra/ folder or a log file
_QUIET = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from gpt2x.data import DataError, check_manifest_matches, load_manifest, prepare

    data = cfg.data
    try:
        d = prepare(data, progress=True)
        m = load_manifest(d, verify=data.verify)
        check_manifest_matches(m, data, d)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    t = m["totals"]
    print(
        f"{d}: {t['tokens']:,} tokens ({t['val_tokens']:,} val, {t['train_tokens']:,} train) "
        f"in {t['shards']} shards from {t['documents']:,} documents"
    )


def cli() -> None:
    register_configs()
    given = {a.split("=", 1)[0] for a in sys.argv[1:]}
    sys.argv += [o for o in _QUIET if o.split("=", 1)[0] not in given]
    main()


if __name__ == "__main__":
    cli()
