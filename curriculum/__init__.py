"""The curriculum engine: plans, LR search, stage runs, stage cache, results and leaderboards."""
