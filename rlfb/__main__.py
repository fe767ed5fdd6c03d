"""``python -m rlfb ...`` runs the ``rlfb`` command line (what ``torchrun -m rlfb`` and ``accelerate launch -m rlfb`` need)."""

import sys

from rlfb.cli import main

if __name__ == "__main__":
    sys.exit(main())
