"""``python -m btlm …`` runs the ``btlm`` command line."""

import sys

from btlm.cli import main

sys.exit(main())
