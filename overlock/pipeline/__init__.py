"""The stage kernel: each stage described once (:mod:`.spec`), run in one protocol (:mod:`.context`),
from one command line (:mod:`.runner`); :mod:`.closure` finds the code a stage runs (the dvc.yaml check).

Light on purpose: importing this package loads the descriptions only.
"""
from overlock.pipeline.spec import OPERATIONAL, STAGES, PathOption, StageSpec

__all__ = ["OPERATIONAL", "STAGES", "PathOption", "StageSpec"]
