"""Nightly job: for each task, check data -> train -> evaluate on test -> predict on score data.

python jobs/nightly.py                                    # the demo, both tasks, local Ray
python jobs/nightly.py --config jobs/configs/image.yaml image.train.epochs=5
ray job submit --working-dir . -- python jobs/nightly.py --config jobs/configs/demo.yaml
"""

import sys

from dlbatch.cli import main
from dlbatch.flow import run_nightly

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], run_nightly, "Train, evaluate and score every configured task."))
