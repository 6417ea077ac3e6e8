"""Build the FedBPT NVFlare job; run it in the simulator, or export it for a real deployment.

python job.py --config configs/tiny.yaml                  # offline smoke run in the simulator
python job.py --model_name roberta-large --task_name sst2  # the paper's setting (GPU, hub access)
python job.py --export --export-dir ./jobs                 # job folder for `nvflare job submit`

The same as the ``fedbpt`` console script (fedbpt.cli.main); from Python, use ``fedbpt.FedBPTRecipe``.
"""

import sys

from fedbpt.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
