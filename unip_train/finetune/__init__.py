"""Fine-tuning and evaluation on infrared (and RGB / depth) segmentation (``unip-finetune``, method.md
sections 4 and 9).

- :mod:`.config` holds every option and the published recipe's defaults; :mod:`.cli` the command
  line; :mod:`.trainer` a run's set-up (data, model, optimizer, resume, run folder) and evaluation;
  :mod:`.engine` the loop; :mod:`.model_file` builds, saves and reloads ``model.pt``.
- :mod:`.extensions`: the interface through which features add loss terms to the one loop.
- :mod:`.layouts` says where each dataset keeps its files, :mod:`.dataset` reads a split,
  :mod:`.augment` augments it; :mod:`.evaluation` computes mIoU.
- :mod:`.backbone` (LayerScale, drop path, relative position bias), :mod:`.ll_fpn` (necks, segmentor)
  and :mod:`.heads` (UperNet, FCN, linear probe) build the model.
"""

from .cli import main
from .config import FinetuneConfig
from .trainer import evaluate_saved, run

__all__ = ["FinetuneConfig", "evaluate_saved", "main", "run"]
