# The official OverLoCK COCO recipe: AdamW lr 2e-4, weight decay 0.05, no decay on norms, biases and the
# ContMix relative position biases (rpb1/rpb2); 12 epochs, lr x0.1 after epochs 8 and 11. The '.bias' key
# also covers depthwise-conv biases, which mmcv's bias_decay_mult leaves to dwconv_decay_mult.
optimizer = dict(
    type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05,
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                       custom_keys={'rpb': dict(decay_mult=0.0), 'norm': dict(decay_mult=0.0),
                                    '.bias': dict(decay_mult=0.0)}))
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
