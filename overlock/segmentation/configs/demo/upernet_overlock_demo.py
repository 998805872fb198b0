# The short demo schedule on the small generated ADE20K-format dataset (CPU minutes): the official recipe
# with a narrower head, small crops, a mild scale jitter, a higher learning rate and a short warm-up. The
# segment stage sets the backbone, crop size, head width, iterations and learning rate from params.
_base_ = ['../_base_/upernet_overlock_ade20k_160k.py']
crop_size = (64, 64)
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='Resize', img_scale=(256, 64), ratio_range=(0.75, 1.5)),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size=crop_size, pad_val=0, seg_pad_val=255),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_semantic_seg']),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='MultiScaleFlipAug', img_scale=(256, 64), flip=False, transforms=[
        dict(type='Resize', keep_ratio=True),
        dict(type='ResizeToMultiple', size_divisor=32, interpolation='bicubic'),
        dict(type='RandomFlip'),
        dict(type='Normalize', **img_norm_cfg),
        dict(type='ImageToTensor', keys=['img']),
        dict(type='Collect', keys=['img']),
    ]),
]
model = dict(decode_head=dict(channels=64), auxiliary_head=dict(channels=32))
data = dict(samples_per_gpu=4, workers_per_gpu=0, train=dict(pipeline=train_pipeline),
            val=dict(pipeline=test_pipeline), test=dict(pipeline=test_pipeline))
optimizer = dict(lr=1e-3)
lr_config = dict(warmup_iters=10, warmup_ratio=0.1)
runner = dict(max_iters=60)
checkpoint_config = dict(interval=10, max_keep_ckpts=2)
evaluation = dict(interval=60)
log_config = dict(interval=10)
