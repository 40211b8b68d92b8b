"""The curriculum engine: plans, LR search, stage runs, stage cache, results and leaderboards."""
import logging
import warnings

# mmcv-lite lacks the compiled deformable-attention op, which no backbone used here needs.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')
# mmengine's own deprecation notices about its file client are not actionable for users of this engine.
warnings.filterwarnings('ignore', message='.*FileClient.*will be deprecated')
logging.getLogger('mmengine').setLevel(logging.ERROR)
