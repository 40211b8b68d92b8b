"""Speed benchmarks of the engine (used by ``tools/benchmark.py``): training throughput per task against
mmpretrain's and a lightly user's pipelines, the downstream protocols, and the sweep's stage cache and LR-search
cost. They drive the engine, so they live in it; ``benchmarks/`` keeps only what knows nothing of the engine."""
