"""Ray job: `ray-lt synthesize` for `ray job submit --working-dir . -- python jobs/synthesize.py --config ...`."""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("synthesize"))
