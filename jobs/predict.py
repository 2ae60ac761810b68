"""Score each configured task's score split with a trained model; publishes predictions all-or-nothing."""

import sys

from dlbatch.cli import main
from dlbatch.flow import run_predict

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], run_predict, "Batch inference on the score split.", with_model=True))
