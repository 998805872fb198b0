# Faster R-CNN + FPN: the Mask R-CNN model without the mask branch.
_base_ = './mask_rcnn_overlock_fpn.py'
model = dict(
    type='FasterRCNN',
    roi_head=dict(mask_roi_extractor=None, mask_head=None),
    train_cfg=dict(rcnn=dict(mask_size=None)))
