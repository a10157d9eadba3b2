"""Fine-tuning and evaluation on infrared segmentation (``unip-finetune``, method.md section 4).

- :mod:`.config` holds every option and the published recipe's defaults; :mod:`.cli` the set-up
  (data, model, optimizer, resume, run folder) and the command line; :mod:`.engine` the loop.
- :mod:`.extensions`: the interface through which features add loss terms to the one loop.
- :mod:`.datasets` reads SODA, MFNet, SCUT-Seg and folder layouts; :mod:`.evaluation` computes mIoU.
- :mod:`.backbone` (LayerScale, drop path, relative position bias), :mod:`.ll_fpn` (necks, segmentor)
  and :mod:`.heads` (UperNet, FCN, linear probe) build the model.
"""

from .cli import FinetuneConfig, evaluate_saved, main, run

__all__ = ["FinetuneConfig", "evaluate_saved", "main", "run"]
