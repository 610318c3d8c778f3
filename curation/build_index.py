"""The indexing stage as a script path, which `ray job submit` runs (`build-index` is the same command).

    python curation/build_index.py --config jobs/demo.yaml --out DIR [--executor local|ray]
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . --
        "$PWD/.venv/bin/python" curation/build_index.py --config jobs/demo.yaml --out DIR   (README: A Ray cluster)

Under `ray job submit` (RAY_ADDRESS is set) the default executor is Ray on that cluster (index.cli).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index.cli import build_index_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
