"""castiron: immutable infrastructure for everyday teams.

The package root re-exports the small public surface that library users rely on; everything
else is reached through its subpackage. It must not import the CLI or any runtime SDK.
"""

from castiron import compiled as _compiled
from castiron.errors import CastironError, ExitCode, SpecError

_compiled.install()  # before anything imports a module that may be compiled

__version__ = "0.1.0"

__all__ = ["CastironError", "ExitCode", "SpecError", "__version__"]
