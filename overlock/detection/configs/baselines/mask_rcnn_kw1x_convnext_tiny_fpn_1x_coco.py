# KernelWarehouse detection table (seed 004): Mask R-CNN + FPN, ConvNeXt-Tiny + KW (1x), 1x AdamW.
# The README row is labelled KW (4x) but links the kw1x config, which this reproduces.
_base_ = ['../_base_/models/mask_rcnn_overlock_fpn.py', './_base_/kw_adamw_1x.py',
          '../_base_/default_runtime.py']
model = dict(
    backbone=dict(_delete_=True, type='dc_kw1x_convnext_tiny', out_indices=(0, 1, 2, 3), drop_path_rate=0.4,
                  ls_init_value=1.0))
# ConvNeXt: layer-wise lr decay 0.95 over 6 layer groups, lr x0.1 after epochs 9 and 11
optimizer = dict(_delete_=True, constructor='LearningRateDecayOptimizerConstructor', type='AdamW',
                 lr=0.0001, betas=(0.9, 0.999), weight_decay=0.05,
                 paramwise_cfg=dict(decay_rate=0.95, decay_type='layer_wise', num_layers=6))
lr_config = dict(step=[9, 11])
custom_hooks = [dict(type='NumClassCheckHook'),  # + the final ODConv/KW temperature while fine-tuning
                dict(type='DynamicConvTemperatureHook', anneal_epochs=0)]
