# ODConv detection table (seed 003): Faster R-CNN + FPN, ResNet-50 + ODConv (4x), 1x SGD.
# Published size 108.91M: the whole detector including the official backbone's unused 1000-way ImageNet
# classifier (backbone.imagenet_head=True reproduces that count; the default leaves it out).
_base_ = ['../_base_/models/faster_rcnn_overlock_fpn.py', '../_base_/datasets/coco_detection.py',
          './_base_/sgd_1x.py', '../_base_/default_runtime.py']
model = dict(
    backbone=dict(_delete_=True, type='dc_odconv4x_resnet50',
                  out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True))
custom_hooks = [dict(type='NumClassCheckHook'),  # + the final ODConv/KW temperature while fine-tuning
                dict(type='DynamicConvTemperatureHook', anneal_epochs=0)]
