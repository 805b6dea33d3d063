"""``tests/support`` for the benchmarks, which run as scripts (``benchmarks/`` is on
``sys.path``): this package's modules are that folder's, so a benchmark imports
``support.media`` as the tests do, and the test material stays out of the wheel."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "tests" / "support")]
