"""``python -m unip_train.pretrain`` (and ``torchrun -m unip_train.pretrain``) runs ``unip-pretrain``."""

import sys

from .cli import main

sys.exit(main())
