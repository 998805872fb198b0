# OverLoCK-B + UperNet on ADE20K, 160k iterations, 8 GPUs x 2 images (official values).
_base_ = ['_base_/upernet_overlock_ade20k_160k.py']
model = dict(
    backbone=dict(type='overlock_b', drop_path_rate=0.5),
    decode_head=dict(in_channels=[80,160,528,720]),
    auxiliary_head=dict(in_channels=528))
