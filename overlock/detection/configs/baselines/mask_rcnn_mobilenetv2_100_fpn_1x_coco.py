# ODConv detection table (seed 003): Mask R-CNN + FPN, MobileNetV2 (1.0x), 1x SGD.
# Published size 23.78M: the whole detector including the official backbone's unused 1000-way ImageNet
# classifier (backbone.imagenet_head=True reproduces that count; the default leaves it out).
_base_ = ['../_base_/models/mask_rcnn_overlock_fpn.py', '../_base_/datasets/coco_instance.py',
          './_base_/sgd_1x.py', '../_base_/default_runtime.py']
model = dict(
    backbone=dict(_delete_=True, type='dc_mobilenetv2_100',
                  out_indices=(0, 1, 2, 3), frozen_stages=1, norm_eval=True))
