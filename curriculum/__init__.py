"""The curriculum engine: plans, LR search, stage runs, stage cache, results and leaderboards."""
import warnings

# mmcv-lite lacks the compiled deformable-attention op, which no backbone used here needs.
warnings.filterwarnings('ignore', message='Fail to import ``MultiScaleDeformableAttention``')
# mmengine's notices about its own deprecated file client are logged, not warned: EngineRunner's logger filter
# (compat.py) drops them.
