# The KernelWarehouse detection recipe (Mask R-CNN, 1x): DETR-style multi-scale / crop augmentation,
# AdamW lr 1e-4, weight decay 0.05 (none on norms), lr x0.1 after epochs 8 and 11, 12 epochs.
_base_ = ['../../_base_/datasets/coco_instance.py']  # replaces its train pipeline
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333), (608, 1333), (640, 1333), (672, 1333),
           (704, 1333), (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='RandomFlip', flip_ratio=0.5),
    dict(type='AutoAugment',
         policies=[
             [dict(type='Resize', img_scale=_scales, multiscale_mode='value', keep_ratio=True)],
             [dict(type='Resize', img_scale=[(400, 1333), (500, 1333), (600, 1333)],
                   multiscale_mode='value', keep_ratio=True),
              dict(type='RandomCrop', crop_type='absolute_range', crop_size=(384, 600),
                   allow_negative_crop=True),
              dict(type='Resize', img_scale=_scales, multiscale_mode='value', override=True,
                   keep_ratio=True)],
         ]),
    dict(type='Normalize', **img_norm_cfg),
    dict(type='Pad', size_divisor=32),
    dict(type='DefaultFormatBundle'),
    dict(type='Collect', keys=['img', 'gt_bboxes', 'gt_labels', 'gt_masks']),
]
data = dict(train=dict(pipeline=train_pipeline))
optimizer = dict(type='AdamW', lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05,
                 paramwise_cfg=dict(custom_keys={'norm': dict(decay_mult=0.0)}))
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
