#!/usr/bin/env python
"""Measure one sweep on the scheduler's backends: stage runs and wall time of tools/leaderboard.py with
--backend local (in-process, and N worker processes) and --backend ray (a local Ray with N workers).

    python tools/sweep_backends.py [--tasks rotation,moco,odc] [--max-len 3] [--image-size 16] [--workers 2]
        [--out DIR]

Writes <out>/sweep_backends.json and .md (default out: benchmarks/results/<date>-sweep-backends) and prints the
Markdown. The configurations run one after the other on the built-in data; on a shared machine compare ratios only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--tasks', default='rotation,moco,odc', help='comma-separated pretext tasks')
    parser.add_argument('--max-len', type=int, default=3)
    parser.add_argument('--image-size', type=int, default=16)
    parser.add_argument('--num-images', type=int, default=200, help='built-in images (all splits)')
    parser.add_argument('--epochs', type=int, default=1)
    parser.add_argument('--batch-size', type=int, default=16, help='batch size of every task')
    parser.add_argument('--workers', type=int, default=2, help='worker processes / Ray workers')
    parser.add_argument('--out', default=None, help='output folder (default benchmarks/results/<date>-sweep-backends)')
    parser.add_argument('--note', default='', help='a line for the report (e.g. what else loaded the machine)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from curriculum.cli import report_header
    from curriculum.perf.speed_backends import measure_backends, render_markdown

    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'leaderboard.py')
    tasks = [task.strip() for task in args.tasks.split(',') if task.strip()]
    report = {**report_header('sweep_backends', argv),
              **measure_backends(tool, tasks, args.max_len, args.image_size, args.num_images, args.epochs,
                                 args.batch_size, args.workers), 'note': args.note}
    out = args.out or os.path.join('benchmarks', 'results', f'{datetime.now():%Y-%m-%d}-sweep-backends')
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'sweep_backends.json'), 'w') as handle:
        json.dump(report, handle, indent=2)
    text = render_markdown(report)
    with open(os.path.join(out, 'sweep_backends.md'), 'w') as handle:
        handle.write(text)
    print(text)
    print(f'written: {out}/sweep_backends.json, {out}/sweep_backends.md')
    failed = [entry['name'] for entry in report['configurations'] if entry['exit_code']]
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
