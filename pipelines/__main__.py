"""`python -m pipelines COMMAND ...` is `ltsweep COMMAND ...` (one CLI), e.g. on a cluster:

ray job submit --working-dir . -- python -m pipelines sweep search_spaces/demo.yaml
"""

import sys

from pipelines.cli import main

sys.exit(main())
