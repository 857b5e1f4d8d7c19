"""Build glue for the optional native module ``blockengine._be_native``.

All metadata lives in pyproject.toml; this file only adds the cffi extension
(``native/build_native.py``).  Compiling it is optional: if there is no
working C compiler (or the compile fails for any reason) the build prints a
warning and installs the package without it, and ``blockengine._native``
falls back to the pure-Python twins at run time.  Set
``BLOCKENGINE_REQUIRE_NATIVE=1`` to turn such a failure into a build error
(e.g. in CI).
"""

import os
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:  # setuptools >= 59 vendors distutils; keep both spellings working
    from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError, PlatformError
    _BUILD_ERRORS = (CCompilerError, CompileError, ExecError, LinkError, PlatformError)
except ImportError:  # pragma: no cover - very old setuptools
    from distutils.errors import (CCompilerError, CompileError, DistutilsExecError,
                                  DistutilsPlatformError, LinkError)
    _BUILD_ERRORS = (CCompilerError, CompileError, DistutilsExecError,
                     DistutilsPlatformError, LinkError)

_REQUIRE_NATIVE = os.environ.get("BLOCKENGINE_REQUIRE_NATIVE", "") not in ("", "0")


class OptionalBuildExt(build_ext):
    """build_ext that skips (with a warning) extensions that fail to build."""

    def _skip(self, what: str, exc: BaseException) -> None:
        if _REQUIRE_NATIVE:
            raise exc
        msg = (f"blockengine: could not build {what} ({exc}); "
               "falling back to the pure-Python implementation")
        warnings.warn(msg)
        print("WARNING: " + msg, file=sys.stderr)

    def run(self):
        try:
            super().run()
        except _BUILD_ERRORS as exc:
            self._skip("the native extension", exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except _BUILD_ERRORS as exc:
            self._skip(ext.name, exc)
            # Forget it, so that install/copy steps don't look for its output.
            self.extensions = [e for e in self.extensions if e is not ext]


_BUILD_SCRIPT = "native/build_native.py"

if os.path.exists(_BUILD_SCRIPT):
    setup(cffi_modules=[_BUILD_SCRIPT + ":ffibuilder"],
          cmdclass={"build_ext": OptionalBuildExt})
else:  # e.g. an sdist made without the native/ sources
    if _REQUIRE_NATIVE:
        raise SystemExit(f"blockengine: {_BUILD_SCRIPT} is missing")
    warnings.warn(f"blockengine: {_BUILD_SCRIPT} is missing; installing without the native module")
    setup()
