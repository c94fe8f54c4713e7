"""Ray job: the whole pipeline (baseline, generator, feedback-guided synthesis, classifier on
real + synthetic, evaluation, report) into one run directory; a rerun skips finished stages.

    ray job submit --working-dir . -- \
        python jobs/balance.py --config configs/digits_lt.yaml --out /shared/runs/digits_lt
"""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("run"))
