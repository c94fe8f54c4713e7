"""Ray job: train the classifier on the real data and evaluate it.

    ray job submit --working-dir . -- \
        python jobs/train.py --config configs/digits_lt.yaml --out runs/x
"""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
