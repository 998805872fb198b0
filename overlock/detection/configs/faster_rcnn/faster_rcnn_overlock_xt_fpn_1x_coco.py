_base_ = ['../_base_/models/faster_rcnn_overlock_fpn.py', '../_base_/datasets/coco_detection.py',
          '../_base_/schedules/adamw_1x.py', '../_base_/default_runtime.py']
model = dict(backbone=dict(type='overlock_xt', drop_path_rate=0.1))
