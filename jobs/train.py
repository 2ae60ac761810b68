"""Train and evaluate each configured task; publishes the best checkpoint under runs/<date>/<task>/model."""

import sys

from dlbatch.cli import main
from dlbatch.flow import run_train

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], run_train, "Train and evaluate every configured task."))
