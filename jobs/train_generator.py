"""Ray job: `ray-lt train-generator` for `ray job submit --working-dir . -- python jobs/train_generator.py --config ...`."""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train-generator"))
