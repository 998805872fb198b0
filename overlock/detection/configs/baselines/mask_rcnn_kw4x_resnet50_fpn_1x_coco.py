# KernelWarehouse detection table (seed 004): Mask R-CNN + FPN, ResNet-50 + KW (4x), 1x AdamW.
_base_ = ['../_base_/models/mask_rcnn_overlock_fpn.py', './_base_/kw_adamw_1x.py',
          '../_base_/default_runtime.py']
model = dict(
    backbone=dict(_delete_=True, type='dc_kw4x_resnet50',
                  out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True))
custom_hooks = [dict(type='NumClassCheckHook'),  # + the final ODConv/KW temperature while fine-tuning
                dict(type='DynamicConvTemperatureHook', anneal_epochs=0)]
