"""``python -m unip_train.finetune`` (and ``torchrun -m unip_train.finetune``) runs ``unip-finetune``."""

import sys

from .cli import main

sys.exit(main())
