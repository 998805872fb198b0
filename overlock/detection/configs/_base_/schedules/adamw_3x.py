# 3x schedule: 36 epochs, lr x0.1 after epochs 27 and 33 (same optimizer as 1x).
_base_ = './adamw_1x.py'
lr_config = dict(step=[27, 33])
runner = dict(max_epochs=36)
