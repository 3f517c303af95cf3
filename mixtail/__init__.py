"""mixtail: a high-throughput one-stage trainer for long-tailed recognition with SMC.

The command line is `mixtail train | eval | bench` (mixtail/cli.py); the work happens in
mixtail.pipelines (data on the device), mixtail.kernels (losses), mixtail.trainer and mixtail.benchmarks.
"""

__version__ = "0.1.0"
