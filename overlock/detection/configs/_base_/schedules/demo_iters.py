# A hundred iterations for the CPU demo (IterBasedRunner). overlock.detection.config sets max_iters,
# the lr step (at 75%) and the checkpoint interval from finetune.max_iters / finetune.checkpoint_interval.
_base_ = './adamw_1x.py'
lr_config = dict(by_epoch=False, warmup_iters=5, step=[75])
runner = dict(_delete_=True, type='IterBasedRunner', max_iters=100)
