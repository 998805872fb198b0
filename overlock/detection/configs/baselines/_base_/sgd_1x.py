# MMDetection's standard 1x schedule, used by the ODConv detection table: SGD lr 0.02 (16 images per batch),
# momentum 0.9, weight decay 1e-4, linear warmup 500 iterations, lr x0.1 after epochs 8 and 11.
optimizer = dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=0.0001)
optimizer_config = dict(grad_clip=None)
lr_config = dict(policy='step', warmup='linear', warmup_iters=500, warmup_ratio=0.001, step=[8, 11])
runner = dict(type='EpochBasedRunner', max_epochs=12)
