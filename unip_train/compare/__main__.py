"""``python -m unip_train.compare`` runs ``unip-compare``."""

import sys

from .cli import main

sys.exit(main())
