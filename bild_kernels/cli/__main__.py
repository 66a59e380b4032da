"""`python -m bild_kernels.cli ...`: the `bild` command."""
import sys

from bild_kernels.cli import main

sys.exit(main())
