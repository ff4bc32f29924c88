"""``python -m models.train --config C --data D --out O``: the command the docs and the GPU machine use.

The training code is in ``models/training/train.py``; this module is only its command-line door.
"""

from __future__ import annotations

import sys

from models.training.train import main

if __name__ == "__main__":
    sys.exit(main())
