import os
import sys

from .cli.main import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a torchrun rank (see exit_without_finalization)
    from .training.distributed import exit_without_finalization

    exit_without_finalization(code)
sys.exit(code)
