"""Ray job: Ray Tune + Optuna over guidance scale, embedding dropout, criterion mixture and loss
weights; the trials share the baseline classifier and generator in the run directory.

    ray job submit --working-dir . -- \
        python jobs/tune.py --config configs/digits_lt.yaml --out /shared/runs/digits_lt_tune
"""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("tune"))
