"""``python -m fastblip`` = the ``fastblip`` console script (also what torchrun runs: ``-m fastblip``)."""

import sys

from fastblip.cli import main

sys.exit(main())
