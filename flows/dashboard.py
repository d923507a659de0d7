"""`make dashboard`: optuna-dashboard over the sweep's study storage.

The storage is params.yaml's ``sweep.storage``, opened as the sweep opens it
(:func:`flows.study.open_storage`): ``null``, the journal file ``.optuna/journal.log``;
``journal:<path>``, that journal file; else an RDB URL. Run from the repository root::

    python -m flows.dashboard --host 127.0.0.1 --port 8080
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.config import ConfigError, load_params
from flows.study import JOURNAL, STUDY_DIR, open_storage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.dashboard", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)

    from optuna_dashboard import run_server

    root = Path.cwd()
    try:
        cfg = load_params(root / "params.yaml").sweep
    except ConfigError as err:
        print(f"make dashboard: error: {err}", file=sys.stderr)
        return 2
    storage = open_storage(cfg.storage, root, cfg)
    where = cfg.storage or str(STUDY_DIR / JOURNAL)
    names = [study.study_name for study in storage.get_all_studies()]
    print(f"optuna-dashboard on http://{args.host}:{args.port} over {where}: "
          f"{', '.join(names) if names else 'no study yet (a sweep creates one)'}", file=sys.stderr, flush=True)
    run_server(storage, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
