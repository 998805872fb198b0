# CPU demo: Mask R-CNN + FPN with slim heads (64-channel FPN) on small images, a hundred iterations.
_base_ = ['../_base_/models/mask_rcnn_overlock_fpn.py', '../_base_/datasets/coco_instance.py',
          '../_base_/schedules/demo_iters.py', '../_base_/default_runtime.py']
width = 64
model = dict(
    backbone=dict(type='overlock_xt', drop_path_rate=0.0),
    neck=dict(out_channels=width),
    rpn_head=dict(in_channels=width, feat_channels=width,
                  anchor_generator=dict(scales=[4], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=width),
        bbox_head=dict(in_channels=width, fc_out_channels=256),
        mask_roi_extractor=dict(out_channels=width),
        mask_head=dict(num_convs=2, in_channels=width, conv_out_channels=width)),
    train_cfg=dict(rpn_proposal=dict(nms_pre=500, max_per_img=200), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200), rcnn=dict(max_per_img=50)))
img_scale = (128, 128)
data = dict(samples_per_gpu=2, workers_per_gpu=0)
checkpoint_config = dict(by_epoch=False, interval=10, max_keep_ckpts=2)
log_config = dict(interval=5)
evaluation = dict(interval=100, by_epoch=False)
