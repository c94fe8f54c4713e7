"""Ray job: the same as `ray-lt synthesize`.

    ray job submit --working-dir . -- python jobs/synthesize.py --config CONFIG --out DIR
"""

import sys

from ray_lt.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("synthesize"))
