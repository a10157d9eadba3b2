"""Training half of the toolkit: NMI-HAD distillation (``unip-pretrain``) and LL-FPN fine-tuning /
linear probing (``unip-finetune``). Imports from :mod:`unip_analysis` only what a teacher needs:
checkpoint loading, attention logits and the selection-file reader."""
