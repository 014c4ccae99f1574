"""`python -m kubellm ...`: the `kubellm` command, run with the working directory off
sys.path (as the console script runs), so a checkout's top-level `kernels/`,
`operator/` and `runtime/` folders never stand in for packages of those names."""

import os
import sys

if not sys.flags.safe_path:
    os.execv(sys.executable, [sys.executable, "-P", "-m", "kubellm", *sys.argv[1:]])

from kubellm.cli import main

sys.exit(main())
