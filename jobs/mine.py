"""Ray job: the same as `ray-lt mine`.

    ray job submit --working-dir . -- python jobs/mine.py --config CONFIG --out DIR
"""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("mine"))
