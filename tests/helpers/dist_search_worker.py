"""Worker for tests/search: one search on two processes (gloo), launched by torchrun.

``python -m torch.distributed.run --nproc_per_node 2 tests/helpers/dist_search_worker.py MODEL OUT`` runs
:func:`tests.helpers.search.small_search` with every process scoring its share; process 0 writes OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers.search import small_search  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        small_search(sys.argv[1], sys.argv[2])
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
