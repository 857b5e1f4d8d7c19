"""cffi build script for ``blockengine._be_native`` (API, out-of-line mode).

Used by setup.py through ``cffi_modules=["native/build_native.py:ffibuilder"]``;
cffi executes this file with ``__file__`` set, from the project root.  The C
declarations are not repeated here: the block between the ``BEGIN CDEF`` and
``END CDEF`` markers of ``native/be.h`` is the single source of truth.

Run it directly (``python native/build_native.py``) to compile the module into
``blockengine/`` without setuptools, e.g. while hacking on the C code.

``BLOCKENGINE_NATIVE_CFLAGS`` / ``BLOCKENGINE_NATIVE_LDFLAGS`` add compiler and
linker flags, e.g. ``-fsanitize=address,undefined -g`` for a sanitizer build
(then run Python with ``LD_PRELOAD`` of libasan/libubsan).
"""

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("l2.c", "refcount.c", "bitmap.c", "crypto.c", "map.c", "check.c")


def _cdef_text() -> str:
    with open(os.path.join(HERE, "be.h"), encoding="utf-8") as f:
        header = f.read()
    begin = header.index("/* BEGIN CDEF */") + len("/* BEGIN CDEF */")
    end = header.index("/* END CDEF */")
    return header[begin:end]


def _source_path(path: str) -> str:
    # setuptools wants source paths relative to the project root (its cwd);
    # cffi's standalone compile() chdirs into its tmpdir and needs them
    # absolute.
    if __name__ == "__main__":
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "blockengine._be_native",
    '#include "be.h"\n',
    sources=[_source_path(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[_source_path(HERE)],
    depends=[_source_path(os.path.join(HERE, "be.h"))],
    extra_compile_args=["-O2", "-std=gnu99", "-Wall", "-Wextra",
                        "-Wno-unused-parameter"]
    + os.environ.get("BLOCKENGINE_NATIVE_CFLAGS", "").split(),
    extra_link_args=os.environ.get("BLOCKENGINE_NATIVE_LDFLAGS", "").split(),
)

if __name__ == "__main__":
    # Standalone build: compile in a temporary dir, copy the .so next to the
    # Python package.
    import glob
    import shutil
    import tempfile

    package = os.path.join(os.path.dirname(HERE), "blockengine")
    with tempfile.TemporaryDirectory() as tmp:
        so = ffibuilder.compile(tmpdir=tmp, verbose="-v" in sys.argv)
        for stale in glob.glob(os.path.join(package, "_be_native.*")):
            os.remove(stale)  # e.g. an .abi3.so from setup.py that would shadow it
        target = os.path.join(package, os.path.basename(so))
        shutil.copy(so, target)
        print(target)
