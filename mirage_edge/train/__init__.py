"""Training: masked multimodal pretraining, fine-tuning, and the generic engine distillation reuses.

Torch-free to import; the submodules import torch:

* `mirage_edge.train.config`      LoopConfig / OptimConfig / PretrainConfig / FinetuneConfig (torch-free)
* `mirage_edge.train.engine`      Trainer (DDP, autocast, accumulation, clipping, checkpoints, exact resume)
* `mirage_edge.train.checkpoint`  save_checkpoint / load_checkpoint / latest_checkpoint (safetensors + JSON)
* `mirage_edge.train.optim`       param_groups (no-decay, layer-wise LR decay), build_adamw, CosineSchedule
* `mirage_edge.train.distributed` device/precision resolution, process group, rank reductions
* `mirage_edge.train.pretrain` / `finetune`  the two commands' implementations
"""
