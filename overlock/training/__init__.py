"""Ray Train classification pretraining: the stage (``pretrain``), the worker loop (``loop``), the timm
recipe (``recipe``) and the checkpoint/output format (``checkpoints``)."""
