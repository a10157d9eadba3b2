"""Fine-tuning and evaluation on infrared segmentation (``unip-finetune``, method.md section 4).

- :mod:`.cli` holds the options, the run set-up and the training loop.
- :mod:`.datasets` reads SODA, MFNet, SCUT-Seg and folder layouts; :mod:`.evaluation` computes mIoU.
- :mod:`.ll_fpn` (necks, segmentor) and :mod:`.heads` (UperNet, FCN, linear probe) build the model.
"""

from .cli import FinetuneConfig, evaluate_saved, main, run

__all__ = ["FinetuneConfig", "evaluate_saved", "main", "run"]
